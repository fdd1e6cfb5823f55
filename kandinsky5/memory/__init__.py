"""Memory and speed features attached to the DiT from outside: fp8 weights (``fp8``), block swap (``block_swap``), the
dtype policy (``dtype_policy``) and the builder that applies them at load time (``build``)."""
