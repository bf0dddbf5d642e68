"""Slow, obviously correct references shared by tests."""


def iou_loop(a, b) -> float:
    """IoU of two internal (0-based continuous pixel-edge) boxes, in float64 scalar arithmetic."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
