"""Models over the memory: the fast continual-learning agent and the tutorial's reference system.

    agent                the fast agent: controller, fused step, MAML, optimizer (make_agent)
    episodic             an episodic memory of (input, target) pairs read by content, beside an agent
    tutorial_reference   the tutorial's system, faithfully (its own class names, kept there)
"""
from .agent import FastAgent, FastMemoryController, FlatAdam, make_agent
from .episodic import EpisodicAgent

__all__ = ["FastAgent", "FastMemoryController", "FlatAdam", "make_agent", "EpisodicAgent"]
