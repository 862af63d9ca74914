"""gm: a mixture of independently trained transformer experts, routed by a local rule."""
