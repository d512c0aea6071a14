"""Evaluation protocols (SLF/ALF/AFF), reporting attacks (PGD-20, AutoAttack), kNN, CKA."""
