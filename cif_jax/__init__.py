"""cif_jax: Clustered Influence Functions (CiF) and influence baselines, JAX-native.

Every parameter-space vector is a flat 1-D array in
``jax.flatten_util.ravel_pytree(params)`` order, in the params' dtype.
"""

from cif_jax.bounds import CorrectedErrorBound as CorrectedErrorBound
from cif_jax.bounds import corrected_error_bound as corrected_error_bound
from cif_jax.bounds import error_bound as error_bound
from cif_jax.bounds import subset_error_bound as subset_error_bound
from cif_jax.cache import InfluenceCache as InfluenceCache
from cif_jax.cache import build_cache as build_cache
from cif_jax.correction import CalibratedCorrection as CalibratedCorrection
from cif_jax.correction import CorrectionTerms as CorrectionTerms
from cif_jax.correction import ExactCorrection as ExactCorrection
from cif_jax.correction import NystromCorrection as NystromCorrection
from cif_jax.curvature import CurvatureSample as CurvatureSample
from cif_jax.curvature import uniform_sample as uniform_sample
from cif_jax.distributed import solver_mesh as solver_mesh
from cif_jax.ggn import apply_ggn as apply_ggn
from cif_jax.ggn import ggn_operator as ggn_operator
from cif_jax.gradients import per_example_grads as per_example_grads
from cif_jax.gradients import subset_gradient_sums as subset_gradient_sums
from cif_jax.influence import influence as influence
from cif_jax.influence import influence_solve as influence_solve
from cif_jax.interaction import InteractionErrorBound as InteractionErrorBound
from cif_jax.interaction import InteractionTerms as InteractionTerms
from cif_jax.interaction import interaction_error_bound as interaction_error_bound
from cif_jax.interaction import cache_interaction_terms as cache_interaction_terms
from cif_jax.interaction import greedy_select as greedy_select
from cif_jax.interaction import group_influence as group_influence
from cif_jax.interaction import SecondOrderInfluence as SecondOrderInfluence
from cif_jax.interaction import interaction_terms as interaction_terms
from cif_jax.interaction import second_order_group_influence as second_order_group_influence
from cif_jax.interaction import second_order_terms as second_order_terms
from cif_jax.interaction import target_curvature as target_curvature
from cif_jax.interaction import target_gradient as target_gradient
from cif_jax.kfac import KFACPreconditioner as KFACPreconditioner
from cif_jax.kfac import ekfac_influence as ekfac_influence
from cif_jax.kfac import ekfac_preconditioner as ekfac_preconditioner
from cif_jax.kfac import ekfac_solve as ekfac_solve
from cif_jax.kfac import kfac_preconditioner as kfac_preconditioner
from cif_jax.kmeans import KMeansResult as KMeansResult
from cif_jax.kmeans import kmeans as kmeans
from cif_jax.kmeans import kmeans_fit as kmeans_fit
from cif_jax.lissa import LiSSA as LiSSA
from cif_jax.lissa import LissaDivergenceError as LissaDivergenceError
from cif_jax.lissa import LissaResult as LissaResult
from cif_jax.lissa import lissa as lissa
from cif_jax.persistence import CacheFileError as CacheFileError
from cif_jax.persistence import load_cache as load_cache
from cif_jax.persistence import save_cache as save_cache
from cif_jax.plan import BatchPlan as BatchPlan
from cif_jax.plan import plan_batches as plan_batches
from cif_jax.precondition import JacobiPreconditioner as JacobiPreconditioner
from cif_jax.precondition import Preconditioner as Preconditioner
from cif_jax.precondition import NystromPreconditioner as NystromPreconditioner
from cif_jax.precondition import jacobi_preconditioner as jacobi_preconditioner
from cif_jax.precondition import nystrom_preconditioner as nystrom_preconditioner
from cif_jax.queries import cluster_alphas as cluster_alphas
from cif_jax.queries import cluster_counts as cluster_counts
from cif_jax.queries import fold_alphas as fold_alphas
from cif_jax.queries import fold_loss_delta as fold_loss_delta
from cif_jax.queries import fold_matrix as fold_matrix
from cif_jax.queries import loss_delta as loss_delta
from cif_jax.queries import loss_delta_from_alphas as loss_delta_from_alphas
from cif_jax.queries import mean_subset_gradients as mean_subset_gradients
from cif_jax.queries import overlap_correction as overlap_correction
from cif_jax.queries import param_delta as param_delta
from cif_jax.queries import self_influence as self_influence
from cif_jax.samplers import feature_sample as feature_sample
from cif_jax.samplers import logit_sample as logit_sample
from cif_jax.sketch import jl_projection as jl_projection
from cif_jax.sketch import sketch as sketch
from cif_jax.solve import CG as CG
from cif_jax.solve import AbstractSolver as AbstractSolver
from cif_jax.solve import LineaxSolver as LineaxSolver
from cif_jax.solve import SolveResult as SolveResult
from cif_jax.solve import solve_ggn as solve_ggn
from cif_jax.task import Task as Task
from cif_jax.task import fingerprint as fingerprint

# Baselines: gradient attribution, retraining, PBRF, linear datamodeling score.
from cif_jax.attribution import grad_dot as grad_dot
from cif_jax.attribution import tracin as tracin
from cif_jax.attribution import trak as trak
from cif_jax.attribution import trak_margin as trak_margin
from cif_jax.lds import LDSResult as LDSResult
from cif_jax.lds import lds as lds
from cif_jax.lds import random_subsets as random_subsets
from cif_jax.lds import subset_losses as subset_losses
from cif_jax.retrain import PBRFResult as PBRFResult
from cif_jax.retrain import RetrainResult as RetrainResult
from cif_jax.retrain import TrainedModels as TrainedModels
from cif_jax.retrain import evaluate_many as evaluate_many
from cif_jax.retrain import pbrf as pbrf
from cif_jax.retrain import retrain as retrain
from cif_jax.retrain import train_many as train_many

# STRIDE: per-subset logit steering on frozen features, per-example scores by Lasso.
from cif_jax.lasso import LassoSolution as LassoSolution
from cif_jax.lasso import lasso as lasso
from cif_jax.stride import StrideOperators as StrideOperators
from cif_jax.stride import nnx_feature_fn as nnx_feature_fn
from cif_jax.stride import stride_features as stride_features
from cif_jax.stride import stride_fit as stride_fit
from cif_jax.stride import stride_responses as stride_responses
from cif_jax.stride import stride_scores as stride_scores
from cif_jax.stride import stride_subsets as stride_subsets

__version__ = "0.1.0"
