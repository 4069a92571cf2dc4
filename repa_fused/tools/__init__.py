"""Tools: the ``repa-fused`` CLI (:mod:`.cli`), the shared test and benchmark cases (:mod:`.cases`), the
gradient check (:mod:`.check`) and the benchmark (:mod:`.bench`). Nothing in the package imports them."""
