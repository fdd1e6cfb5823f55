"""The Kandinsky 5 model and its maths: the DiT (``dit``), attention backends (``attention``), NABLA block-sparse
attention (``nabla``), rectified flow (``flow``), the HunyuanVideo VAE adapter (``vae``), the text encoders
(``text_encoders``) and checkpoint loading (``loading``).  Pure modules: no flags, no globals."""
