#!/usr/bin/env python
"""detectron2 training/evaluation entry point for the configs in configs/ (needs detectron2, which
is not a dependency of this repository; see README.md).

detectron2's standard trainer plus two things the MoCo detection protocol uses (He et al. 2020
§4.2; facebookresearch/moco detection/): a Res5ROIHeads whose res5 stage ends with one more norm
layer (cfg.MODEL.RESNETS.NORM, SyncBN here), so the fine-tuned C4 head is normalised like the
backbone, and the VOC or COCO evaluator chosen by the test set's name.

  python eval/detection/train_net.py --num-gpus 8 \
      --config-file eval/detection/configs/pascal_voc_R_50_C4_24k.yaml MODEL.WEIGHTS backbone.pkl
"""
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with a norm layer appended to its res5 stage."""

    def _build_res5_block(self, cfg):
        res5, channels = super()._build_res5_block(cfg)
        res5.add_module('norm', get_norm(cfg.MODEL.RESNETS.NORM, channels))
        return res5, channels


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if 'voc' in dataset_name:
            return PascalVOCDetectionEvaluator(dataset_name)  # AP, AP50, AP75 over the 20 classes
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, 'inference'))


def setup(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == '__main__':
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
