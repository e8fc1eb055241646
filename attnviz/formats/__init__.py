"""Bytes in and out, validated: uploads (never unpickled), exports (HTML, CSV, .npz) and URL state."""
