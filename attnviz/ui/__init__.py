"""The Streamlit layer: the only part of attnviz that imports streamlit (widgets and caching wrappers)."""
