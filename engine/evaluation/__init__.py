"""Interactive-segmentation evaluation: simulated clicks, mIoU@k, NoC@t, box mIoU.

metrics = evaluate_interactive(model, store_holdout(store))
metrics.to_dict()  # miou_1click, miou_5click, noc85, noc90, box_miou, images, objects
"""

from engine.evaluation.clicks import Click, next_click
from engine.evaluation.holdout import coco_holdout, store_holdout, synthetic_holdout
from engine.evaluation.interactive import EvalSample, evaluate_interactive, mask_boxes_xyxy
from engine.evaluation.metrics import InteractiveMetrics, mask_iou, number_of_clicks, summarize

__all__ = [
    "Click",
    "EvalSample",
    "InteractiveMetrics",
    "coco_holdout",
    "evaluate_interactive",
    "mask_boxes_xyxy",
    "mask_iou",
    "next_click",
    "number_of_clicks",
    "store_holdout",
    "summarize",
    "synthetic_holdout",
]
