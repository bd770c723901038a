"""The front end's side: turning settings into an engine config, and per-request defaults.

* ``engine_setup``: the streaming engine config, or a start-up refusal that
  says what to change;
* ``limits``: ``max_tokens`` for requests that give none when streams have no
  length limit.
"""
