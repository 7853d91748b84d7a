"""Data sources and what fetches them."""
