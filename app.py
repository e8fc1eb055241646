"""attnviz: the Streamlit entry point. Pages live in pages/; this file only configures and navigates."""

import streamlit as st

st.set_page_config(page_title="attnviz — attention explorer", page_icon="🔍", layout="wide")

pages = [
    st.Page("pages/playground.py", title="Playground", icon="🎛️", default=True),
    st.Page("pages/mask_lab.py", title="Mask Lab", icon="🧩"),
    st.Page("pages/real_model.py", title="Real model", icon="🧠"),
    st.Page("pages/long_sequences.py", title="Long sequences", icon="📏"),
]
navigation = st.navigation(pages)
st.sidebar.caption(
    "attnviz — see every head's logits, masks and probabilities. "
    "Semantics follow Keras MultiHeadAttention (True = may attend)."
)
navigation.run()
