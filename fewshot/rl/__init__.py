"""Meta-reinforcement learning: MAML with policy gradients (inner) and TRPO (outer), Finn et al. 2017 section 5.3."""
