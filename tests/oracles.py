"""Plain, independent implementations used as test oracles (float64, written for clarity, not speed)."""
import torch


def swav_sinkhorn_f64(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn (main_swav.py) for one process, written out plainly, in float64."""
    q = torch.exp(scores.double() / epsilon).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()
