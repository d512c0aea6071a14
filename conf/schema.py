"""The typed config schema: every key's type, allowed values or range, default and meaning.

Hydra composes `conf/` (groups of YAML options) into one dict; `conf.compose` validates that dict
against `Root` below and hands the code the validated dict with every default filled in. The
defaults Hydra composes on top of come from here too (`conf.compose.register_schema_defaults`),
so a YAML option file holds only the values it changes. A field's docstring is its one-line
meaning (`--help` prints it); its type is the validator (pydantic, strict: no silent coercion).
Rules that span several fields are code, in `conf/rules.py`.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

EPS_HINT = "pixel scale; 8/255 = 0.0314"

# Names that registries in the code must match (tests/test_config.py checks each against its registry).
METHOD_NAMES = ("simclr", "supcon", "acl", "rocl", "deacl", "supervised")
ARCHS = ("resnet18", "resnet50", "wrn34_10")
DATASET_STATS_NAMES = ("cifar10", "cifar100", "stl10", "svhn", "imagenet", "digits", "none")
PROTOCOLS = ("slf", "alf", "aff", "le", "rle")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Facts about the datasets the data pipeline reads (here, because validation needs them).
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "stl10", "svhn", "imagefolder")
BUNDLED_DATASETS = ("digits", "synthetic")  # need no files on disk (no data.root)
DATASET_SPLITS: dict[str, tuple[str, ...]] = {  # "val" is held out of train (data.val_fraction > 0)
    "digits": ("train", "val", "test"),
    "synthetic": ("train", "val", "test"),
    "cifar10": ("train", "val", "test"),
    "cifar100": ("train", "val", "test"),
    "stl10": ("train", "val", "test", "unlabeled", "train+unlabeled"),
    "svhn": ("train", "val", "test", "extra"),
    "imagefolder": ("train", "val", "test"),
}
FIXED_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "stl10": 10, "svhn": 10}
SYNTHETIC_MAX_CLASSES = 256

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Auto = Literal["auto"]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True,
                              validate_default=True)


# ------------------------------------------------------------------------------------ attacks

class Attack(Section):
    """An L-inf / L2 PGD attack in pixel space [0, 1] with a uniform random start."""

    eps: Annotated[float, Field(ge=0, le=1, json_schema_extra={"hint": EPS_HINT})] = 8 / 255
    """radius of the perturbation ball"""
    alpha: PositiveFloat = 2 / 255
    """step size of each PGD step"""
    steps: PositiveInt = 5
    """number of PGD steps"""
    norm: Literal["linf", "l2"] = "linf"
    """threat model"""
    gather_negatives: bool = True
    """contrastive attack objectives see every rank's batch (as on one GPU); false: this rank's only"""
    random_start: bool = True
    """start from a random point of the ball (false: from x itself, delta = 0, as the empirical study)"""
    start: Literal["uniform", "normal"] = "uniform"
    """random start: uniform U(-eps, eps) (Madry, ACL, DeACL, RoCL) | normal x + 0.001 N(0, 1) (TRADES)"""
    clamp_start: bool = False
    """clip the random start x + delta to [0, 1] before the first gradient (RoCL does; ACL, DeACL, TRADES do not)"""


def _attack(steps: int) -> Any:
    return Field(default_factory=lambda: Attack(steps=steps))


class MethodAttack(Section):
    """A method's own training-attack settings: each non-null key replaces the `attack` group's value."""

    eps: Annotated[float, Field(ge=0, le=1, json_schema_extra={"hint": EPS_HINT})] | None = None
    """radius (null: attack.eps)"""
    alpha: PositiveFloat | None = None
    """step size (null: attack.alpha)"""
    steps: PositiveInt | None = None
    """PGD steps (null: attack.steps)"""
    random_start: bool | None = None
    """random start (null: attack.random_start)"""
    start: Literal["uniform", "normal"] | None = None
    """kind of random start (null: attack.start)"""
    clamp_start: bool | None = None
    """clip the random start to [0, 1] (null: attack.clamp_start)"""
    gather_negatives: bool | None = None
    """contrastive attack objectives see every rank's batch (null: attack.gather_negatives)"""


def _method_attack(**values: Any) -> Any:
    return Field(default_factory=lambda: MethodAttack(**values))


# ------------------------------------------------------------------------------------ data

class ColorAugment(Section):
    """SimCLR's colour jitter + grayscale, applied per sample on the device."""

    brightness: NonNegFloat = 0.4
    """ColorJitter brightness strength"""
    contrast: NonNegFloat = 0.4
    """ColorJitter contrast strength"""
    saturation: NonNegFloat = 0.4
    """ColorJitter saturation strength"""
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    """ColorJitter hue strength"""
    jitter_p: Probability = 0.8
    """probability that a sample is colour-jittered"""
    grayscale_p: Probability = 0.2
    """probability that a sample is turned grey"""


class Augment(Section):
    """Augmentation strengths of the FFCV loaders."""

    crop_scale: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2, max_length=2)] = [0.08, 1.0]
    """RandomResizedCrop area range [low, high] of the SSL views"""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """resampling of the SSL views' random resized crop (ACL's reference: bicubic)"""
    crop_padding: NonNegInt = 4
    """zero padding of the weak view's random crop (DeACL, fine-tuning)"""
    flip: bool = True
    """random horizontal flips"""
    color: ColorAugment = Field(default_factory=ColorAugment)
    """colour jitter and grayscale of the SSL views"""


class Data(Section):
    """Dataset source, splits, where its .beton files live, augmentation."""

    name: Literal[DATASETS]  # type: ignore[valid-type]
    """dataset source"""
    root: str | None = None
    """folder holding the dataset's files (real datasets)"""
    download: bool = False
    """fetch the dataset through torchvision on first use"""
    resolution: Annotated[int, Field(ge=8)] = 32
    """image side in pixels (images are resized when written)"""
    num_classes: Annotated[int, Field(ge=2)] | None = None
    """number of classes (fixed for the named datasets)"""
    stats: Literal[DATASET_STATS_NAMES] = "none"  # type: ignore[valid-type]
    """per-channel normalisation statistics, applied inside the model"""
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """fraction of train held out as the val split (Tune's objective; never the test set)"""
    split_seed: NonNegInt = 0
    """seed of the stratified val hold-out"""
    splits: list[str] = ["train", "test"]
    """splits written to .beton files"""
    beton_dir: str = "${output_dir}/data"
    """folder of the .beton files"""
    write_mode: Literal["raw", "jpg", "smart"] = "raw"
    """how images are stored in the .beton"""
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 90
    """JPEG quality (write_mode jpg / smart)"""
    max_resolution: Annotated[int, Field(ge=8)] | None = None
    """largest stored side (null: resolution)"""
    write_workers: PositiveInt = 1
    """processes writing a .beton"""
    train_size: PositiveInt = 5000
    """synthetic: number of train images"""
    test_size: PositiveInt = 1000
    """synthetic: number of test images"""
    seed: NonNegInt = 0
    """synthetic: seed of the generated images"""
    augment: Augment = Field(default_factory=Augment)
    """augmentation strengths"""


class Model(Section):
    """Backbone and the projector's default widths (each method's `projector` sets its layout)."""

    arch: Literal[ARCHS] = "resnet18"  # type: ignore[valid-type]
    """backbone"""
    width: PositiveInt = 64
    """base width of the ResNet (64: the papers')"""
    stem_padding: Literal[0, 1, 2, 3] = 1
    """padding of the 3x3 stem: 1 (ACL/RoCL) or 2 (DeACL/solo-learn)"""
    proj_hidden_dim: PositiveInt = 2048
    """hidden width of the projector MLP (where the method's projector.hidden_dim is null)"""
    proj_output_dim: PositiveInt = 128
    """output width of the projector MLP (where the method's projector.output_dim is null)"""


class Projector(Section):
    """Layout of a method's projector MLP (Linear layers with ReLU between them)."""

    layers: PositiveInt = 2
    """number of Linear layers"""
    hidden_dim: PositiveInt | Literal["feature"] | None = None
    """width of the hidden layers: a number | feature (the backbone's feature width) | null (model.proj_hidden_dim)"""
    output_dim: PositiveInt | Literal["feature"] | None = None
    """output width: a number | feature | null (model.proj_output_dim)"""
    bn: Literal["hidden", "all", "none"] = "hidden"
    """BatchNorm1d after each hidden Linear | after every Linear, the last too (ACL) | none (RoCL, the study)"""
    bias: Literal["last", "first", "all", "none"] = "last"
    """which Linear layers have a bias: last | first (ACL) | all (RoCL, solo-learn, the study) | none"""


def _projector(**values: Any) -> Any:
    return Field(default_factory=lambda: Projector(**values))


# ------------------------------------------------------------------------------------ methods

class LARS(Section):
    """How LARS computes and applies its layer-wise trust ratio (optimizer=lars)."""

    eta: PositiveFloat = 0.001
    """trust coefficient"""
    trust_norm: Literal["sum", "combined"] = "sum"
    """trust = eta |w| / (|g| + wd |w| + eps) (torchlars, ACL, solo-learn) | eta |w| / |g + wd w| (SimCLR's TF LARS)"""
    eps: NonNegFloat = 1e-8
    """eps of the sum denominator (torchlars, solo-learn: 1e-8; ACL: 0)"""
    zero_threshold: NonNegFloat = 0.0
    """trust 1 where |w| or |g| is below this or 0 (ACL: 1e-15, which catches a bias before a BN; others: 0)"""
    exclude_1d: bool = False
    """1-d parameters (biases, BN) get no trust ratio and no weight decay (SimCLR's TF LARS, solo-learn); false: all adapted (ACL, torchlars)"""
    clip: bool = False
    """solo-learn's clip: trust ratio min(trust / lr, 1)"""
    lr_in_momentum: bool = False
    """the lr scales the step before it enters the momentum buffer (ACL, SimCLR's TF LARS); false: after (torch SGD)"""


class Train(Section):
    """Optimisation of a training stage (a method's pre-training)."""

    epochs: PositiveInt
    """epochs of the stage"""
    batch_size: PositiveInt
    """global batch (split across cluster.num_workers)"""
    optimizer: Literal["sgd", "lars", "adam"]
    """optimiser (adam: torch's Adam, betas 0.9 / 0.999, as the empirical study)"""
    lr: PositiveFloat
    """peak learning rate (before lr_scaling)"""
    lr_scaling: Literal["linear", "none"] = "linear"
    """linear: lr * batch_size / 256; none: lr as given"""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """momentum"""
    weight_decay: NonNegFloat = 0.0
    """L2 weight decay"""
    warmup_epochs: NonNegInt = 0
    """linear warm-up epochs"""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    """learning-rate schedule after the warm-up"""
    milestones: list[PositiveInt] = []
    """schedule=step: lr / 10 at these epochs"""
    fused: bool | Auto = "auto"
    """SGD: the fused kernel (auto: where this torch has one)"""
    lars: LARS = Field(default_factory=LARS)
    """LARS's trust ratio (optimizer=lars)"""


Forwards = Literal["three", "two", "one"]


class MethodBase(Section):
    """A method's config: its name (the option of group `method`), its keys and its training."""

    train: Train
    """optimisation of the stage"""
    attack: MethodAttack = Field(default_factory=MethodAttack)
    """the method's own training-attack settings (null: the attack group's)"""


class SimCLR(MethodBase):
    """SimCLR: NT-Xent between two views, negatives from every rank."""

    name: Literal["simclr"]
    """method name (set by the option: method=simclr)"""
    temperature: PositiveFloat = 0.5
    """NT-Xent temperature"""
    separate_forwards: bool = False
    """each view through its own train-mode forward (solo-learn: DeACL's teacher); false: one forward of [x1; x2] (SimCLR's TF code)"""
    projector: Projector = Field(default_factory=Projector)
    """projector layout"""


class SupCon(MethodBase):
    """SupCon / SCL as in the empirical study; adversarial pre-training optional."""

    name: Literal["supcon"]
    """method name (set by the option: method=supcon)"""
    temperature: PositiveFloat = 0.07
    """contrastive temperature"""
    use_labels: bool = True
    """true: SupCon's label positives; false: SimCLR's instance positives"""
    adversarial: bool = False
    """add the adversarial term contrastive(x, PGD(x))"""
    adv_weight: NonNegFloat = 1.0
    """weight of the adversarial term"""
    adv_view: Literal["original", "first"] = "original"
    """the attacked image: original = un-augmented (the study; three_view loader) | first = the first augmented view"""
    attack_train_mode: bool = True
    """attack with BN in train mode and separate forwards of x and x' (the study's pgd_linf); false: eval mode"""
    separate_forwards: bool = True
    """each batch ([x; x'], then each view) through its own train-mode forward (the study); false: one forward of all"""
    projector: Projector = _projector(hidden_dim="feature", output_dim=100, bn="none", bias="all")
    """projector layout (the study's: Linear(2048, 2048)-ReLU-Linear(2048, 100), no BN)"""
    attack: MethodAttack = _method_attack(alpha=0.01, random_start=False)
    """the study's training attack: alpha 0.01 from delta = 0 (null: the attack group's)"""


class ACL(MethodBase):
    """ACL (Jiang et al. 2020): adversarial contrastive learning."""

    name: Literal["acl"]
    """method name (set by the option: method=acl)"""
    variant: Literal["a2a", "a2s", "ds"] = "ds"
    """a2a | a2s | ds (dual stream with dual BN: the paper's best)"""
    temperature: PositiveFloat = 0.5
    """NT-Xent temperature"""
    stream_weights: Annotated[list[NonNegFloat], Field(min_length=2, max_length=2)] = [0.5, 0.5]
    """ds: weights of [clean (normal BN) stream, adversarial (pgd BN) stream]"""
    attack_train_mode: bool = False
    """attack with BN in train mode (false: eval mode, as the reference)"""
    a2s_dual_bn: bool = True
    """a2s: clean view through `normal` BNs, adversarial view through `pgd` BNs"""
    projector: Projector = _projector(layers=3, hidden_dim="feature", output_dim="feature", bn="all", bias="first")
    """projector layout (ACL's proj_head: Linear(bias)-BN-ReLU-Linear-BN-ReLU-Linear-BN, 512 wide, BNs dual)"""


class RoCL(MethodBase):
    """RoCL (Kim et al. 2020): instance-wise attacks, loss over [t; t'; t_adv]."""

    name: Literal["rocl"]
    """method name (set by the option: method=rocl)"""
    temperature: PositiveFloat = 0.5
    """NT-Xent temperature"""
    lam: PositiveFloat = 256.0
    """loss = NT-Xent([t; t'; t_adv]) + (1/lam) NT-Xent(t_adv, t')"""
    detach_right: bool = True
    """reference quirk: similarities use a detached right operand (loss and attack)"""
    sum_positives: bool = True
    """reference scale: sum (not mean) of an anchor's two positive terms"""
    separate_forwards: bool = True
    """the (1/lam) term from its own train-mode forward of [t_adv; t'] before the main one (reference); false: one forward"""
    reg_gather_negatives: bool = False
    """the (1/lam) term's negatives from every rank (reference: this GPU's batch only)"""
    projector: Projector = _projector(bn="none", bias="all")
    """projector layout (RoCL's: Linear(512, 2048)-ReLU-Linear(2048, 128), biases, no BN)"""
    attack: MethodAttack = _method_attack(eps=0.0314, alpha=0.007, steps=7, clamp_start=True, gather_negatives=False)
    """RoCL's training attack: eps 0.0314, alpha 0.007, 7 steps, clipped start, this GPU's batch (null: the attack group's)"""


class DeACL(MethodBase):
    """DeACL stage 2: adversarial distillation of a frozen SSL teacher."""

    name: Literal["deacl"]
    """method name (set by the option: method=deacl)"""
    lam: NonNegFloat = 2.0
    """weight of the robustness term -cos(f_s(x'), f_s(x))"""
    init_from_teacher: bool = True
    """initialise the student from the teacher (false: from scratch)"""


class Supervised(MethodBase):
    """Supervised baselines: CE, PGD-AT (Madry), TRADES."""

    name: Literal["supervised"]
    """method name (set by the option: method=supervised)"""
    loss: Literal["ce", "pgd_at", "trades", "ce_clean_adv"] = "ce"
    """training loss (ce_clean_adv: CE(x) + CE(PGD(x)), the empirical study's adversarial SL)"""
    beta: NonNegFloat = 6.0
    """TRADES weight of KL(p_clean || p_adv)"""
    trades_forwards: Forwards = "three"
    """TRADES' train-mode forwards: three (x, x', x again: trades.py) | two (x, x': ACL's) | one ([x; x'] together)"""
    attack_train_mode: bool = False
    """attack with BN in train mode (the study's SL); false: eval mode (Madry, TRADES)"""
    normalize_logits: bool = False
    """CE (loss and attack) on L2-normalised logits (the study's EvalNet returns F.normalize(logits))"""
    attack: MethodAttack = _method_attack(steps=10)
    """training attack: 10 steps as PGD-AT and TRADES train (null: the attack group's)"""


METHOD_SCHEMAS: dict[str, type[MethodBase]] = {
    "simclr": SimCLR, "supcon": SupCon, "acl": ACL, "rocl": RoCL, "deacl": DeACL, "supervised": Supervised}
AnyMethod = Annotated[Union[SimCLR, SupCon, ACL, RoCL, DeACL, Supervised], Field(discriminator="name")]


class Teacher(Section):
    """DeACL's stage-1 teacher."""

    checkpoint: str | None = None
    """a teacher model.pt to distil from instead of training one"""
    method: AnyMethod
    """the teacher's method (group method@teacher.method)"""


# ------------------------------------------------------------------------------------ evaluation

class ProtocolLR(Section):
    """Learning rate of each evaluation protocol's head."""

    slf: PositiveFloat = 0.1
    """standard linear fine-tuning"""
    alf: PositiveFloat = 0.01
    """adversarial linear fine-tuning"""
    aff: PositiveFloat = 0.01
    """adversarial full fine-tuning"""
    le: PositiveFloat = 0.1
    """RoCL's linear evaluation (clean)"""
    rle: PositiveFloat = 0.01
    """RoCL's robust linear evaluation (PGD-10)"""


class LinearEval(Section):
    """Training of the evaluation heads (DeACL's recipe by default)."""

    epochs: PositiveInt = 25
    """epochs of each head"""
    batch_size: PositiveInt = 512
    """global batch"""
    optimizer: Literal["sgd", "lars", "adam"] = "sgd"
    """optimiser"""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """momentum"""
    weight_decay: NonNegFloat = 2e-4
    """L2 weight decay"""
    lr: ProtocolLR = Field(default_factory=ProtocolLR)
    """learning rate per protocol"""
    milestones: list[PositiveInt] = [15, 20]
    """lr / 10 at these epochs (counted from 0)"""
    trades_beta: NonNegFloat = 6.0
    """TRADES beta of ALF / AFF"""
    trades_forwards: Forwards = "three"
    """TRADES' train-mode forwards: three (x, x', x again: trades.py, DeACL) | two (x, x': ACL) | one ([x; x'] together)"""
    augment: Literal["weak", "none"] = "weak"
    """training images of the heads: weak (crop + flip: DeACL, ACL) | none (un-augmented: RoCL's LE, the study)"""
    head_init: Literal["default", "zero"] = "default"
    """the new linear head: torch's default init | zeros (ACL's cvt_state_dict)"""


class AutoAttackCfg(Section):
    """AutoAttack for reporting: the authors' code (pyautoattack), at the protocol's radius."""

    enabled: bool = True
    """run AutoAttack after PGD"""
    version: Literal["standard", "plus", "rand"] = "standard"
    """attack suite (standard: APGD-CE, APGD-T, FAB-T at 100 iterations, Square 5,000 queries)"""
    n_examples: PositiveInt | None = 1000
    """first n test images (null: the full test set); SA and PGD RA are reported on them too"""
    norm: Literal["Linf", "L2"] = "Linf"
    """threat model"""
    eps: Annotated[float, Field(gt=0)] | None = None
    """radius (null: eval.pgd.eps, which is L-inf; set it for L2, e.g. 0.5)"""


class RobustnessCurve(Section):
    """Accuracy against the attack radius: PGD at each eps on the test split, plotted beside results.json."""

    eps: list[Annotated[float, Field(gt=0, le=1)]] = []
    """radii (eval.pgd's norm; empty: no curve); eps 0 is SA"""
    steps: PositiveInt = 20
    """PGD steps at every radius (step size 2.5 eps / steps, Madry et al.)"""
    n_examples: PositiveInt | None = None
    """first n test images (null: the whole test split)"""


class EvalData(Data):
    """A second dataset the heads train and test on (transfer; group `+data@eval.data=<option>`)."""

    beton_dir: str | None = None
    """folder of its .beton files (null: data.beton_dir)"""


# The 15 corruptions of Hendrycks & Dietterich's benchmark (CIFAR-10-C / CIFAR-100-C also ship
# speckle_noise, gaussian_blur, spatter and saturate, which the benchmark's mean leaves out).
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")


class Corruptions(Section):
    """Accuracy of each trained head on CIFAR-10-C / CIFAR-100-C (their published .npy layout)."""

    root: str | None = None
    """folder holding <corruption>.npy (uint8 N x 32 x 32 x 3, 5 equal blocks: severity 1 first) and labels.npy (null: off)"""
    names: Annotated[list[str], Field(min_length=1)] = list(CORRUPTIONS)
    """corruptions (file names without .npy); the 15 of the benchmark by default"""
    severities: Annotated[list[Literal[1, 2, 3, 4, 5]], Field(min_length=1)] = [1, 2, 3, 4, 5]
    """severities to evaluate"""
    n_examples: PositiveInt | None = None
    """first n images of each severity (null: all, 10,000 in the published files)"""


class BlackBox(Section):
    """RoCL's black-box transfer attack: PGD (eval.pgd) crafted on a surrogate, evaluated on the target head."""

    surrogate: str | None = None
    """encoder model.pt (a head is trained on it as the protocol trains the target's) | classifier_<protocol>.pt | teacher (recipe=deacl) | null: off"""
    n_examples: PositiveInt | None = None
    """first n test images (null: the whole test split)"""


class Eval(Section):
    """Protocols after training and the reporting attacks."""

    protocols: list[Literal[PROTOCOLS]] = ["slf"]  # type: ignore[valid-type]
    """slf | alf | aff | le | rle (RoCL's linear evaluation, clean / PGD-10)"""
    label_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    """heads train on this class-stratified, seeded fraction of the training split (label efficiency: 0.01, 0.1; null: all)"""
    bn_mode: Literal["eval", "train"] = "eval"
    """frozen protocols: eval = BN running stats fixed; train = DeACL's reference quirk"""
    alf_loss: Literal["trades", "pgd_at", "ce_clean_adv"] = "trades"
    """ALF's loss on the head (ce_clean_adv: CE(x) + CE(PGD(x)), the study's partial-AT)"""
    aff_loss: Literal["trades", "pgd_at", "ce_clean_adv"] = "trades"
    """AFF's loss (ce_clean_adv: the study's full-AT)"""
    train_attack_steps: PositiveInt = 10
    """PGD steps of the heads' training attack (ALF / AFF / rLE)"""
    train_attack_alpha: PositiveFloat | None = None
    """step size of the heads' training attack (null: eval.pgd.alpha; RoCL's rLE: 0.007)"""
    train_attack_eps: Annotated[float, Field(ge=0, le=1, json_schema_extra={"hint": EPS_HINT})] | None = None
    """radius of the heads' training attack (null: eval.pgd.eps; the study trains at 8/255, tests at 4/255)"""
    train_attack_mode: Literal["eval", "training"] = "eval"
    """BN mode of the heads' training attack: eval | training = the modes the head trains in (the study)"""
    attack_normalized_logits: bool = False
    """the heads' attacks (training and test) maximise CE of L2-normalised logits (the study's EvalNet)"""
    label: str | None = None
    """row name in the results table (recipe=evaluate)"""
    linear: LinearEval = Field(default_factory=LinearEval)
    """training of the heads"""
    pgd: Attack = _attack(20)
    """PGD for reporting (PGD-20)"""
    autoattack: AutoAttackCfg = Field(default_factory=AutoAttackCfg)
    """AutoAttack for reporting"""
    curve: RobustnessCurve = Field(default_factory=RobustnessCurve)
    """the robustness curve (PGD accuracy against eps)"""
    data: EvalData | None = None
    """transfer: the heads train and test on this dataset, resized to data.resolution (null: data)"""
    corruptions: Corruptions = Field(default_factory=Corruptions)
    """common corruptions (CIFAR-10-C / CIFAR-100-C)"""
    blackbox: BlackBox = Field(default_factory=BlackBox)
    """black-box transfer attack from a surrogate (RoCL)"""


class Monitor(Section):
    """Cheap measurements during pre-training."""

    knn_every: NonNegInt = 5
    """kNN accuracy on val (or test) every N epochs and after the last; 0: off"""
    robust_every: NonNegInt = 0
    """linear probe + clean/PGD accuracy on the held-out val split every N epochs (Tune's metric); 0: off"""
    val_attack: Attack = _attack(10)
    """the FIXED attack of that monitor (never follows the searched training attack)"""
    probe_steps: PositiveInt = 100
    """L-BFGS iterations of the full-batch linear probe"""
    probe_weight_decay: NonNegFloat = 1e-3
    """L2 weight of the probe"""
    val_max_examples: PositiveInt | None = None
    """attack at most this many val images per check (null: all)"""


# ------------------------------------------------------------------------------------ cluster

class Debug(Section):
    """Fault injection for tests and fire drills; never set in real runs."""

    fail_at_epoch: PositiveInt | None = None
    """N: rank `fail_rank` dies half-way through epoch N, once"""
    fail_rank: NonNegInt = 0
    """the rank that dies"""
    fail_delay_s: NonNegFloat = 5.0
    """wait before dying (Ray registers a checkpoint on its next 2 s poll)"""
    nonfinite_at_epoch: PositiveInt | None = None
    """N: the loss of epoch N is made NaN (the run must stop cleanly)"""
    slow_checkpoint_write_s: NonNegFloat = 0.0
    """sleep this long per checkpoint file, after the local write and after each file uploaded into storage
    (fault tests: epochs longer than Ray's 2 s registration poll, a wide window for a kill mid-write)"""


class Cluster(Section):
    """Where Ray Train runs and with how many workers."""

    address: str | None = None
    """Ray address (null: start Ray in-process, or RAY_ADDRESS if set)"""
    num_workers: PositiveInt = 1
    """data-parallel workers"""
    use_gpu: bool | Auto = "auto"
    """auto: GPU if the cluster has one"""
    cpus_per_worker: PositiveInt = 2
    """CPUs of each worker (also its FFCV decoding threads)"""
    gpus_per_worker: PositiveFloat = 1.0
    """GPUs of each worker"""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers"""
    storage_path: str | None = None
    """Ray Train storage (null: <output_dir>/ray_results); shared (NFS or s3://) on multi-node clusters"""
    max_failures: Annotated[int, Field(ge=-1)] = 1
    """worker-group restarts from the last checkpoint (-1: unlimited)"""
    sync_bn: bool = False
    """synchronise BatchNorm statistics over the global batch"""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """process-group backend (auto: nccl on GPU, gloo on CPU)"""
    timeout_s: PositiveInt = 1800
    """collective (process group) timeout"""
    checkpoints_to_keep: PositiveInt = 2
    """Ray checkpoints kept per stage"""
    debug: Debug = Field(default_factory=Debug)
    """fault injection (tests)"""


# ------------------------------------------------------------------------------------ tune

Number = Union[float, str]  # "8/255" is allowed in search spaces


class SpaceSpec(Section):
    """One searched key."""

    type: Literal["choice", "grid", "uniform", "loguniform", "quniform", "randint"]
    """distribution"""
    values: list[Any] | None = None
    """choice / grid: the values"""
    low: Number | None = None
    """lower bound (uniform, loguniform, quniform, randint)"""
    high: Number | None = None
    """upper bound"""
    q: Number | None = None
    """quniform: quantum"""
    relative_to: str | None = None
    """the sampled value multiplies this key's value (e.g. alpha relative to eps)"""


class Scheduler(Section):
    """Trial scheduler."""

    name: Literal["asha", "fifo"] = "asha"
    """asha: early stopping (HyperBandForBOHB with tune.search_alg=bohb); fifo: every trial runs its full budget"""
    grace_period: PositiveInt = 1
    """tune.time_attr units before a trial can be stopped (epochs, or compute)"""
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    """ASHA keeps 1/reduction_factor of the trials at each rung"""
    max_t: PositiveInt | None = None
    """a trial's budget in tune.time_attr units (null: method.train.epochs; required for compute)"""
    brackets: PositiveInt = 1
    """ASHA brackets"""


class Tune(Section):
    """Ray Tune search (python -m tune.search)."""

    enabled: bool = False
    """a sweep preset is selected"""
    preset: str | None = None
    """preset name (in the sweep's folder name)"""
    name: str | None = None
    """sweep folder name (null: derived from the config)"""
    overrides: list[str] = []
    """overrides applied before the command line's"""
    metric: str = "objective"
    """reported metric to optimise"""
    mode: Literal["max", "min"] = "max"
    """maximise or minimise the metric"""
    objective: Literal["robust", "clean", "weighted"] = "robust"
    """val monitor objective: robust | clean | w * robust + (1 - w) * clean"""
    objective_weight: Probability = 0.5
    """w of the weighted objective"""
    num_samples: PositiveInt = 1
    """sampled configurations"""
    seed: NonNegInt = 0
    """sampling seed (random sampling, TPE, BOHB)"""
    search_alg: Literal["random", "optuna", "bohb"] = "random"
    """random: sampling; optuna: TPE (OptunaSearch); bohb: TuneBOHB with its HyperBandForBOHB"""
    time_attr: Literal["epoch", "compute"] = "epoch"
    """the scheduler's budget axis: epochs, or compute = cumulative images x (1 + training PGD steps)"""
    scheduler: Scheduler = Field(default_factory=Scheduler)
    """trial scheduler"""
    max_concurrent_trials: PositiveInt | None = None
    """null: as many as the cluster fits"""
    retry_errored: bool = True
    """on restore, errored trials resume from their last checkpoint"""
    verbose: Annotated[int, Field(ge=0, le=3)] = 1
    """Tune progress output: 0 silent, 1 status table, 2 + trial results"""
    space: dict[str, SpaceSpec] = {}
    """searched keys (dotted config keys)"""
    local_cpus: PositiveInt | None = None
    """CPUs of a local Ray for the sweep (null: this machine's)"""
    storage_path: str | None = None
    """where sweeps live (null: cluster.storage_path)"""


# ------------------------------------------------------------------------------------ study, analysis

class Scheme(Section):
    """One training scheme of the study."""

    method: Literal[METHOD_NAMES]  # type: ignore[valid-type]
    """the method that trains it"""
    standard: dict[str, Any]
    """method keys of its standard pre-training"""
    adversarial: dict[str, Any]
    """method keys of its adversarial pre-training"""


class Scenario(Section):
    """One robustness scenario of the study: which encoder gets which head."""

    pretraining: Literal["standard", "adversarial"]
    """the encoder: the scheme's standard or adversarial pre-training"""
    protocol: Literal[PROTOCOLS]  # type: ignore[valid-type]
    """the evaluation protocol that trains its head"""


STUDY_SCENARIOS = {  # the empirical study's README, Table 1 (cl_scl_PAT.py / cl_scl_FAT.py: 'AT-Partial AT', 'AT-Full AT')
    "ST": {"pretraining": "standard", "protocol": "slf"},
    "AT": {"pretraining": "adversarial", "protocol": "slf"},
    "partial-AT": {"pretraining": "adversarial", "protocol": "alf"},
    "full-AT": {"pretraining": "adversarial", "protocol": "aff"},
}


class Study(Section):
    """The empirical study (python -m tune.study)."""

    schemes: dict[str, Scheme] = {}
    """training schemes"""
    scenarios: dict[str, Scenario] = Field(default_factory=lambda: {k: Scenario(**v) for k, v in STUDY_SCENARIOS.items()})
    """robustness scenarios: name -> (pre-training, protocol); the study's Table 1 by default"""
    run: list[str] = []
    """which schemes to run"""
    overrides: list[str] = []
    """extra overrides for every trial (budgets)"""
    name: str | None = None
    """study folder name (null: derived from the config)"""
    max_concurrent_trials: PositiveInt | None = None
    """null: from the cluster size"""
    cka: bool = True
    """CKA / probe figures per scheme"""


class Analysis(Section):
    """Representation analysis (python -m trainer.analyze_representations)."""

    split: Literal["train", "val", "test"] = "test"
    """images compared by CKA and used as the probes' test set"""
    n_examples: Annotated[int, Field(ge=4)] = 500
    """how many of them (first n of the split)"""
    n_probe_train: PositiveInt = 1000
    """training images of the probes (and of the attacked linear head)"""
    batch_size: PositiveInt = 256
    """batch of the feature extraction"""
    cka_pooling: Literal["flatten", "avg"] = "flatten"
    """flatten: C*H*W per layer (Kornblith et al.); avg: global average pool"""
    debiased: bool = False
    """debiased (unbiased-HSIC) CKA"""
    probes: bool = True
    """per-layer linear probes"""
    probe_pooling: Literal["flatten", "avg"] = "avg"
    """per-layer probe features"""
    probe_adv_train: bool = True
    """also fit probes on adversarial training features"""
    probe_weight_decay: NonNegFloat = 1e-4
    """L2 weight of the probes"""
    probe_max_iter: PositiveInt = 100
    """L-BFGS iterations per probe"""
    pgd: Attack = _attack(20)
    """adversarial examples (CE on the attacked classifier)"""


# ------------------------------------------------------------------------------------ root

class Root(Section):
    """The whole configuration."""

    seed: Annotated[int, Field(ge=0, lt=2 ** 32)] = 0
    """seed of every random draw of the run (with the epoch, the sample and the rank)"""
    seeds: Annotated[list[Annotated[int, Field(ge=0, lt=2 ** 32)]], Field(min_length=1)] | None = None
    """several seeds: the recipe once per seed (parallel trials), mean ± std reported"""
    output_dir: str = "outputs"
    """every run writes under output_dir/run_name"""
    run_name: str | None = None
    """null: derived from the config hash (same config -> same run -> resume)"""
    recipe: Literal["auto", "pretrain", "deacl", "evaluate"] = "auto"
    """auto: DeACL -> teacher, student, evaluation; others -> train, evaluation; evaluate: checkpoint="""
    checkpoint: str | None = None
    """recipe=evaluate: the model.pt to evaluate"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU"""
    channels_last: bool | Auto = "auto"
    """memory layout of the networks (auto: on for GPU and CPU)"""
    compile: bool | Literal[COMPILE_MODES] = False  # type: ignore[valid-type]
    """torch.compile the networks (or an inductor mode); eager without a compiler"""
    freeze_params_in_attack: bool | Auto = "auto"
    """parameters leave autograd during PGD (auto: only with compile)"""
    deterministic: bool = False
    """PyTorch's deterministic algorithms and cuBLAS's fixed workspace (GPU; CPU runs are deterministic without it)"""
    data: Data
    """dataset"""
    model: Model = Field(default_factory=Model)
    """backbone and projector"""
    method: AnyMethod
    """the method the main stage trains"""
    teacher: Teacher
    """DeACL's teacher"""
    attack: Attack = Field(default_factory=Attack)
    """the training attack of adversarial methods"""
    eval: Eval = Field(default_factory=Eval)
    """evaluation after training"""
    cluster: Cluster = Field(default_factory=Cluster)
    """Ray Train resources"""
    monitor: Monitor = Field(default_factory=Monitor)
    """measurements during pre-training"""
    tune: Tune = Field(default_factory=Tune)
    """Ray Tune search"""
    study: Study | None = None
    """the empirical study (+study=default)"""
    analysis: Analysis | None = None
    """representation analysis (+analysis=default)"""
