"""HTTP routes, one module per protocol: TGI (``tgi``), OpenAI (``openai``), service info (``info``)."""
