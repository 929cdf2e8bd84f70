"""The runtime: an artifact becomes a transformers model whose projections are TealLinear (modules.py), assembled
on the meta device (assemble.py) by load() (loading.py) or transformers' from_pretrained (hf.py); on CUDA the
projections of a group share one launch (fusion.py), norms / SiLU-and-mul / rotary take one-launch kernels
(elementwise.py), and decoding.py replays a static-cache decode step in a CUDA graph."""
