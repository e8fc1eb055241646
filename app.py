"""`streamlit run app.py` from a checkout: the app itself ships inside the package (attnviz/app/main.py).

An installed attnviz starts with the `attnviz` command from any folder; this shim is for developers who run
Streamlit on the checkout. The checkout's .streamlit/config.toml links to the packaged settings.
"""

from attnviz.app.main import run

run()
