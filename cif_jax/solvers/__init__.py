"""Damped-GGN solvers (block CG, lineax), preconditioners (Nystrom, Jacobi, K-FAC, EK-FAC), sharded solves."""
