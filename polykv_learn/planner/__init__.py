"""Learned planning shared by training and deployment: routers, the budget allocator and ``LearnedPlanner``.

Neither ``learn/`` (training) nor ``deploy/`` owns this package; both import it, and it imports neither.
"""

from polykv_learn.planner.allocator import BudgetAllocator
from polykv_learn.planner.head_allocator import HeadAllocator
from polykv_learn.planner.learned import LearnedPlanner, check_budget
from polykv_learn.planner.router import GBDTRouter, MLPRouter

__all__ = ["BudgetAllocator", "GBDTRouter", "HeadAllocator", "LearnedPlanner", "MLPRouter", "check_budget"]
