"""The Streamlit app: the only part of attnviz that imports streamlit.

main.py          the entry script (st.navigation over page_scripts/), run by `attnviz` and by app.py
cli.py           the `attnviz` command: `streamlit run main.py` with the packaged config.toml as flags
server.py        per-process server tuning that a config file cannot express
page_scripts/    one thin script per page: widgets -> page model -> figures
ui/              widgets that return plain values, caching wrappers, sharing and export boxes
"""
