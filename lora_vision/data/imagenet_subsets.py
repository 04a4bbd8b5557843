"""ImageNet-1k class presets (Imagenette, Imagewoof, ImageNet-100) and wnid <-> index <-> name lookups.

timm's ``ImageNetInfo`` is the source of the 1k wnid order (the standard label indices of pretrained
heads) and of the human-readable names. Presets are stored sorted by wnid, the label order an ImageFolder
over the subset's folders gives, which is the order the published subset results use.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from timm.data import ImageNetInfo

from lora_vision.data.errors import DataOptionError

IMAGENETTE: tuple[str, ...] = (
    "n01440764",  # tench
    "n02102040",  # English springer
    "n02979186",  # cassette player
    "n03000684",  # chain saw
    "n03028079",  # church
    "n03394916",  # French horn
    "n03417042",  # garbage truck
    "n03425413",  # gas pump
    "n03445777",  # golf ball
    "n03888257",  # parachute
)

IMAGEWOOF: tuple[str, ...] = (
    "n02086240",  # Shih-Tzu
    "n02087394",  # Rhodesian ridgeback
    "n02088364",  # beagle
    "n02089973",  # English foxhound
    "n02093754",  # Border terrier
    "n02096294",  # Australian terrier
    "n02099601",  # golden retriever
    "n02105641",  # Old English sheepdog
    "n02111889",  # Samoyed
    "n02115641",  # dingo
)

# ImageNet-100 of CMC (Tian, Krishnan & Isola, "Contrastive Multiview Coding", 2019): the 100 wnids of
# imagenet100.txt in github.com/HobbitLong/CMC, sorted.
IMAGENET100: tuple[str, ...] = (
    "n01558993",
    "n01692333",
    "n01729322",
    "n01735189",
    "n01749939",
    "n01773797",
    "n01820546",
    "n01855672",
    "n01978455",
    "n01980166",
    "n01983481",
    "n02009229",
    "n02018207",
    "n02085620",
    "n02086240",
    "n02086910",
    "n02087046",
    "n02089867",
    "n02089973",
    "n02090622",
    "n02091831",
    "n02093428",
    "n02099849",
    "n02100583",
    "n02104029",
    "n02105505",
    "n02106550",
    "n02107142",
    "n02108089",
    "n02109047",
    "n02113799",
    "n02113978",
    "n02114855",
    "n02116738",
    "n02119022",
    "n02123045",
    "n02138441",
    "n02172182",
    "n02231487",
    "n02259212",
    "n02326432",
    "n02396427",
    "n02483362",
    "n02488291",
    "n02701002",
    "n02788148",
    "n02804414",
    "n02859443",
    "n02869837",
    "n02877765",
    "n02974003",
    "n03017168",
    "n03032252",
    "n03062245",
    "n03085013",
    "n03259280",
    "n03379051",
    "n03424325",
    "n03492542",
    "n03494278",
    "n03530642",
    "n03584829",
    "n03594734",
    "n03637318",
    "n03642806",
    "n03764736",
    "n03775546",
    "n03777754",
    "n03785016",
    "n03787032",
    "n03794056",
    "n03837869",
    "n03891251",
    "n03903868",
    "n03930630",
    "n03947888",
    "n04026417",
    "n04067472",
    "n04099969",
    "n04111531",
    "n04127249",
    "n04136333",
    "n04229816",
    "n04238763",
    "n04336792",
    "n04418357",
    "n04429376",
    "n04435653",
    "n04485082",
    "n04493381",
    "n04517823",
    "n04589890",
    "n04592741",
    "n07714571",
    "n07715103",
    "n07753275",
    "n07831146",
    "n07836838",
    "n13037406",
    "n13040303",
)

PRESETS: dict[str, tuple[str, ...]] = {
    "imagenette": IMAGENETTE,
    "imagewoof": IMAGEWOOF,
    "imagenet100": IMAGENET100,
}


@cache
def _info() -> ImageNetInfo:
    return ImageNetInfo()


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in label-index order (index 0 is n01440764, tench)."""
    return tuple(_info().label_names())


@cache
def _wnid_to_index() -> dict[str, int]:
    return {wnid: index for index, wnid in enumerate(imagenet_wnids())}


def imagenet_index(wnid: str) -> int:
    """The ImageNet-1k label index of ``wnid``; ValueError naming it if it is not an ImageNet-1k class."""
    try:
        return _wnid_to_index()[wnid]
    except KeyError:
        raise DataOptionError(f"{wnid!r} is not an ImageNet-1k wnid (expected e.g. 'n01440764')") from None


def imagenet_class_name(wnid: str) -> str:
    """Short human-readable name of ``wnid``: the first synonym of timm's description ('tench')."""
    return _info().index_to_description(imagenet_index(wnid)).split(",")[0]


def resolve_classes(preset: str | None, classes: Sequence[str] | None) -> tuple[str, ...]:
    """The wnid list from exactly one of a preset name or an explicit list (kept in the given order)."""
    if (preset is None) == (classes is None):
        raise DataOptionError(
            f"give exactly one of preset ({sorted(PRESETS)}) or classes (a list of wnids); "
            f"got preset={preset!r}, classes={classes!r}"
        )
    if preset is not None:
        if preset not in PRESETS:
            raise DataOptionError(f"unknown ImageNet subset preset {preset!r}; valid presets: {sorted(PRESETS)}")
        return PRESETS[preset]
    wnids = tuple(classes)
    duplicates = sorted({w for w in wnids if wnids.count(w) > 1})
    if not wnids or duplicates:
        raise DataOptionError(f"classes must be a non-empty list of distinct wnids; duplicated: {duplicates}")
    for wnid in wnids:
        imagenet_index(wnid)
    return wnids
