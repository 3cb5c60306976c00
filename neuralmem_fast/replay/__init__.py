"""Prioritized replay on a C++ sum tree.

    sum_tree            SumTree (the C++ tree, or its numpy twin NumpySumTree)
    storage             preallocated ring storage for tensor / tuple / dict items
    buffer              PrioritizedReplayBuffer
    experience_replay   ExperienceReplay, the tutorial's class on the tree
    torchrl             PrioritizedSampler for TorchRL's replay buffers (needs torchrl;
                        not imported here: `from neuralmem_fast.replay.torchrl import PrioritizedSampler`)
"""
from .buffer import PrioritizedReplayBuffer
from .experience_replay import ExperienceReplay
from .sum_tree import NumpySumTree, SumTree, has_native_sum_tree

__all__ = ["SumTree", "NumpySumTree", "PrioritizedReplayBuffer", "ExperienceReplay", "has_native_sum_tree"]
