"""Layer 1: covariance operators (dense, diagonal, diagonal plus low rank)."""

from .base import DENSE_LIMIT as DENSE_LIMIT, AbstractOperator as AbstractOperator
from .convert import as_dplr as as_dplr, densify as densify
from .dense import (
    Dense as Dense,
    check_matrix as check_matrix,
    psd_factor as psd_factor,
    psd_sqrt as psd_sqrt,
)
from .diagonal import Diagonal as Diagonal, check_diagonal as check_diagonal
from .lowrank import DiagonalPlusLowRank as DiagonalPlusLowRank, sym as sym
