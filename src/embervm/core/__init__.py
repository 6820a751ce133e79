"""Services and state rules of Embervm (written next; only the caller exists so far)."""
