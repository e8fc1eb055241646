"""Page models: what each page computes and shows, without widgets (no Streamlit here).

One module or package per page: playground, masklab, longseq (Long sequences), walkthrough (Step by step),
projections, real_model (the Real model page's state; the model code itself is the core's attnviz.models).
A page model imports the core and formats, never another page model: what two pages share moves down.
"""
