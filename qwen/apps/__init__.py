"""Interactive front ends: the terminal chat (``cli``) and the browser chat (``web``)."""
