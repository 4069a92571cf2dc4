"""Training integration: config keys (:mod:`.config`), the λ schedule (:mod:`.schedule`), hidden-state
capture (:mod:`.capture`), vision encoders (:mod:`.encoders`), latent decoding (:mod:`.decode`), the
regularizers (:mod:`.regularizers`) and the encoder feature cache (:mod:`.cache`). Imports the losses of
:mod:`repa_fused.ops` only, never a kernel and never the tools."""
