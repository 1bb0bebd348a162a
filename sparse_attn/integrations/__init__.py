"""Integrations with model libraries (each imported only where its library is installed)."""
