"""The streaming rule itself, with no vLLM in it: pure arithmetic and torch.

* ``policy``: which KV blocks a stream keeps and which RoPE positions its
  tokens get (shared by scheduler and worker, so they never disagree);
* ``stream_view``: a stream seen through its cache (resident tokens, renumbered);
* ``stream_state``: what the worker keeps about one stream;
* ``rerotation``: moving cached keys to new RoPE positions.
"""
