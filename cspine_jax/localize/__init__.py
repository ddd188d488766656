"""Where each vertebra lies in a study, from stage 1's per-slice outputs (pure numpy).

Stage 1 gives, per slice, presence probabilities of C1..C7 and one normalised box of the visible
vertebrae. ``ranges`` turns the presences into each vertebra's slice range, ``boxes`` the per-slice
boxes into its box, ``derive`` applies both under one set of :class:`derive.Rules`, ``refine``
replaces the boxes by a box refiner's second look and ``compare`` scores the result against a
mask. Nothing here runs a model: scorers and refiners come in as plain callables.
"""
