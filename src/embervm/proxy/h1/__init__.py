"""The HTTP/1.1 wing: clients that speak HTTP/1.1 (``embervm.proxy`` has the map)."""
