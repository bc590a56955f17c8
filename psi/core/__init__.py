"""The method, torch only: the PSI manifold's operations (:mod:`manifold`), PSI-SGD(M) and PSI-GD
(:mod:`psisgd`, its functional core :mod:`functional`) and which layers are scale-invariant
(:mod:`discovery`, its numerical probe :mod:`probe`). May import: torch, nothing else of psi."""
