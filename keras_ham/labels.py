"""The seven HAM10000 diagnostic classes, in the one order every artifact uses."""

CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
NUM_CLASSES = len(CLASS_NAMES)

CLASS_FULL_NAMES = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

CLASS_DESCRIPTIONS = {
    "akiec": "Sun-induced pre-cancerous or in-situ squamous lesion; may progress to invasive carcinoma.",
    "bcc": "The most common skin cancer; grows locally and rarely spreads, but needs treatment.",
    "bkl": "Benign keratoses: seborrhoeic keratosis, solar lentigo and lichen-planus-like keratosis.",
    "df": "A common benign fibrous skin nodule, often on the legs.",
    "mel": "Malignant tumour of melanocytes; the most dangerous class, early detection matters.",
    "nv": "A common benign mole; by far the largest class in HAM10000.",
    "vasc": "Benign vascular lesions such as cherry angiomas, angiokeratomas and pyogenic granulomas.",
}

CLASS_TO_INDEX = {name: index for index, name in enumerate(CLASS_NAMES)}
