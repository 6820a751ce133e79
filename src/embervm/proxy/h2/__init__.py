"""The HTTP/2 wing: clients that speak HTTP/2 (``embervm.proxy`` has the map)."""
