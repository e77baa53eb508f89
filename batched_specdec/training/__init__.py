"""Training tools: distil a draft for a target on the target's own generations.

* :mod:`.distill`: the command (``python -m batched_specdec.training``) and its pipeline;
* :mod:`.data`: prompts, the target's generations and the vocabulary subset; :mod:`.feature`: the feature
  draft's training set and loss; :mod:`.save`: the draft's config, initialisation, files and manifest.
"""
