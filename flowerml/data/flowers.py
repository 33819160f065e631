"""Facts about Oxford Flowers-102: where it lives, its checksums, its classes and counts.

Data only, no I/O. Source: https://www.robots.ox.ac.uk/~vgg/data/flowers/102/
(Nilsback & Zisserman, ICVGIP 2008).
"""

from __future__ import annotations

BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"

ARCHIVE = "102flowers.tgz"
LABELS = "imagelabels.mat"
SETID = "setid.mat"
SOURCE_FILES: tuple[str, ...] = (ARCHIVE, LABELS, SETID)

SOURCE_MD5: dict[str, str] = {
    ARCHIVE: "52808999861908f626f3c1f4e79d11fa",
    LABELS: "e0620be6f572b9609742df49c70aed4d",
    SETID: "a5357ecc9cb78c4bef273ce3793fc85c",
}

# setid.mat keys for the official split, in the order we publish them.
SPLIT_KEYS: dict[str, str] = {"train": "trnid", "valid": "valid", "test": "tstid"}
SPLITS: tuple[str, ...] = tuple(SPLIT_KEYS)

NUM_CLASSES = 102

# Archive members are exactly jpg/image_NNNNN.jpg, 1-based ids.
MEMBER_PATTERN = r"jpg/image_(\d{5})\.jpg"

# The 102 class names in label order (label 1 first), as commonly published with the dataset.
CLASS_NAMES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle",
    "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian",
    "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil",
    "sword lily", "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy", "primula", "sunflower",
    "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris",
    "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia",
    "blanket flower", "trumpet creeper", "blackberry lily",
)
assert len(CLASS_NAMES) == NUM_CLASSES


def class_dir(label: int) -> str:
    """Zero-padded class directory for a 1-based label, so lexicographic order is label order."""
    return f"{label:03d}"


def image_name(image_id: int) -> str:
    """File name of a 1-based image id, as in the archive."""
    return f"image_{image_id:05d}.jpg"


def image_id(name: str) -> int:
    """The 1-based id in an image file name ("image_00042.jpg" -> 42)."""
    return int(name.removeprefix("image_").removesuffix(".jpg"))


def class_names_for(num_classes: int) -> list[str]:
    """Names for `num_classes` labels: the real ones, or generic names beyond 102 (synthetic data)."""
    return [CLASS_NAMES[i] if i < NUM_CLASSES else f"class {i + 1}" for i in range(num_classes)]
