"""Producing the weights in models/: training, synthetic degradations, evaluation, bundling and the
model card's generated tables. May import ``models`` and ``service``; neither imports this."""
