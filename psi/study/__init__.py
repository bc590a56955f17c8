"""The protocol over many runs: profiles and their parameter checks, the plan of a study, learning-rate
selection, results tables, paired statistics, the choice of the CPU design.
May import: psi.engine, psi.core (and pandas, scipy)."""
