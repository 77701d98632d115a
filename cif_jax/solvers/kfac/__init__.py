"""Kronecker-factored preconditioners (K-FAC, EK-FAC) for the damped-GGN solves, and an EK-FAC estimator.

The GGN we solve with is ``(1/N) sum_i J_i^T W_i J_i``. For a layer whose
pre-activations are a matrix product ``z_t = W a_t`` (+ b) of its inputs
``a_t`` (one per position t: one for a dense layer, one per output pixel for a
convolution written as im2col patches times a kernel matrix), the GGN block of
``W`` is, with ``W_i = L_i L_i^T`` and ``g_itk = dz_t/d(outputs)^T L_ik``
(column k of the output-Hessian factor propagated back to the layer's
pre-activations),

$$
\\mathrm{GGN}_{WW} = \\frac1N \\sum_i \\sum_k \\mathrm{vec}(D_{ik}) \\mathrm{vec}(D_{ik})^\\top,
\\qquad D_{ik} = \\sum_t g_{itk} a_{it}^\\top .
$$

**K-FAC** (Martens and Grosse 2015, eq. (1) and section 3; for convolutions
Grosse and Martens 2016, KFC, eqs. (11)-(12)) approximates it by ``G (x) A`` with

$$
A = \\frac1N \\sum_i \\sum_t \\bar a_{it} \\bar a_{it}^\\top,
\\qquad G = \\frac1N \\sum_i \\frac1{T} \\sum_t \\sum_k g_{itk} g_{itk}^\\top,
$$

``a-bar = [a, 1]`` when a bias is added to the product (the bias is the last
column of ``[W, b]``), T the number of positions (1 for a dense layer; KFC's
"spatially uncorrelated derivatives" give ``T Omega (x) Gamma = A (x) G``).
The ``L_ik`` are the exact factors of the output Hessian (Botev, Ritter and
Barber 2017, "KFLR"), not sampled labels, so that the factors describe the same
GGN as the CG operator. The damped block is the factored Tikhonov form of
Martens and Grosse (2015, section 6.3),

$$
(G + \\tfrac{\\sqrt\\lambda}{\\pi} I) \\otimes (A + \\pi \\sqrt\\lambda\\, I),
\\qquad \\pi = \\sqrt{\\frac{\\mathrm{tr}(A)/\\dim A}{\\mathrm{tr}(G)/\\dim G}},
$$

applied to a weight-shaped block ``V`` (out x in) as
``(G + sqrt(lambda)/pi I)^{-1} V (A + pi sqrt(lambda) I)^{-1}`` through the
eigendecompositions of A and G.

**EK-FAC** (George et al. 2018, eq. (11); Grosse et al. 2023, section 2.2.3)
keeps the Kronecker eigenbasis ``Q_G (x) Q_A`` and re-estimates the eigenvalues
exactly in it: ``s_oj = (1/N) sum_i sum_k ((Q_G^T D_ik Q_A)_oj)^2``, the diagonal
of the GGN block in that basis; the damped block is
``(Q_G (x) Q_A) (diag(s) + lambda) (Q_G (x) Q_A)^T``. On a one-layer linear
model with squared loss the Kronecker factorisation is exact and EK-FAC is the
damped GGN.

Parameters that are in no K-FAC block (normalisation scales, embeddings, ...)
get the exact GGN diagonal (a Jacobi block). Everything is estimated from one
pass over the data (two for EK-FAC), one vector-Jacobian product per example and
output, as :func:`cif_jax.jacobi_preconditioner`.

**Finding the layers** (why not ``kfac-jax``: see the docs' development page).
The layers are found model-agnostically, in the jaxpr of ``task.apply_fn`` for
one example: a layer is a ``dot_general`` with one
contracting dimension whose one operand is a whole parameter leaf (possibly
reshaped, transposed or cast: an im2col kernel ``(kh, kw, cin, cout) ->
(kh*kw*cin, cout)``) used nowhere else, and whose other operand is the layer
input; or a ``conv_general_dilated`` (no groups, no input dilation) with a whole
parameter leaf as its kernel, whose inputs are then the patches
(``lax.conv_general_dilated_patches``, checked against the convolution on random
operands before use). A bias is a parameter vector added, broadcast along the
output features, to that product and used nowhere else. The jaxpr is then
evaluated with a zero perturbation added to each product (its
vector-Jacobian product gives the ``g``) and the product's input recorded (the
``a``); the evaluation is checked against ``apply_fn`` before use. This works for
any :class:`cif_jax.Task` (``from_nnx``, ``from_linen``, ``from_equinox`` or
plain functions). Parameter arrays of two or more dimensions used any other way
get a diagonal block, with a warning; models in which no layer is found fall
back to Jacobi with a warning.

References:
    Martens and Grosse, "Optimizing neural networks with Kronecker-factored approximate
    curvature", ICML 2015. https://arxiv.org/abs/1503.05671
    Grosse and Martens, "A Kronecker-factored approximate Fisher matrix for convolution
    layers", ICML 2016. https://arxiv.org/abs/1602.01407
    Botev, Ritter and Barber, "Practical Gauss-Newton optimisation for deep learning",
    ICML 2017. https://arxiv.org/abs/1706.03662
    George, Laurent, Bouthillier, Ballas and Vincent, "Fast approximate natural gradient
    descent in a Kronecker-factored eigenbasis", NeurIPS 2018. https://arxiv.org/abs/1806.03884
    Grosse et al., "Studying large language model generalization with influence
    functions", 2023. https://arxiv.org/abs/2308.03296
"""

from .approximate import ekfac_influence as ekfac_influence
from .approximate import ekfac_solve as ekfac_solve
from .blocks import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from .blocks import KFACPreconditioner as KFACPreconditioner
from .blocks import check_damping as check_damping
from .blocks import inverse as inverse
from .blocks import inverse_sqrt as inverse_sqrt
from .build import build_kfac as build_kfac
from .build import ekfac_preconditioner as ekfac_preconditioner
from .build import kfac_preconditioner as kfac_preconditioner
