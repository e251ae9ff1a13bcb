"""Subject tables of C-Eval, MMLU and CMMLU, with the categories the original scripts print.

The order of every table is the order in which the original scripts walk the subjects (their tqdm bars, their
result CSVs), and the order of every ``*_CATEGORIES`` dict is the order in which they print the categories.
The aggregation differs per benchmark (spec 1.1-1.3): C-Eval and CMMLU report the unweighted mean of subject
accuracies per category (macro), MMLU the mean over all questions of a group (micro).
"""

from __future__ import annotations

from collections.abc import Iterable

# subject id (file name stem) -> (English name, Chinese name, category), as in C-Eval's subject_mapping.json
CEVAL_SUBJECTS: dict[str, tuple[str, str, str]] = {
    "computer_network": ("Computer Network", "计算机网络", "STEM"),
    "operating_system": ("Operating System", "操作系统", "STEM"),
    "computer_architecture": ("Computer Architecture", "计算机组成", "STEM"),
    "college_programming": ("College Programming", "大学编程", "STEM"),
    "college_physics": ("College Physics", "大学物理", "STEM"),
    "college_chemistry": ("College Chemistry", "大学化学", "STEM"),
    "advanced_mathematics": ("Advanced Mathematics", "高等数学", "STEM"),
    "probability_and_statistics": ("Probability and Statistics", "概率统计", "STEM"),
    "discrete_mathematics": ("Discrete Mathematics", "离散数学", "STEM"),
    "electrical_engineer": ("Electrical Engineer", "注册电气工程师", "STEM"),
    "metrology_engineer": ("Metrology Engineer", "注册计量师", "STEM"),
    "high_school_mathematics": ("High School Mathematics", "高中数学", "STEM"),
    "high_school_physics": ("High School Physics", "高中物理", "STEM"),
    "high_school_chemistry": ("High School Chemistry", "高中化学", "STEM"),
    "high_school_biology": ("High School Biology", "高中生物", "STEM"),
    "middle_school_mathematics": ("Middle School Mathematics", "初中数学", "STEM"),
    "middle_school_biology": ("Middle School Biology", "初中生物", "STEM"),
    "middle_school_physics": ("Middle School Physics", "初中物理", "STEM"),
    "middle_school_chemistry": ("Middle School Chemistry", "初中化学", "STEM"),
    "veterinary_medicine": ("Veterinary Medicine", "兽医学", "STEM"),
    "college_economics": ("College Economics", "大学经济学", "Social Science"),
    "business_administration": ("Business Administration", "工商管理", "Social Science"),
    "marxism": ("Marxism", "马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("Mao Zedong Thought", "毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("Education Science", "教育学", "Social Science"),
    "teacher_qualification": ("Teacher Qualification", "教师资格", "Social Science"),
    "high_school_politics": ("High School Politics", "高中政治", "Social Science"),
    "high_school_geography": ("High School Geography", "高中地理", "Social Science"),
    "middle_school_politics": ("Middle School Politics", "初中政治", "Social Science"),
    "middle_school_geography": ("Middle School Geography", "初中地理", "Social Science"),
    "modern_chinese_history": ("Modern Chinese History", "近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("Ideological and Moral Cultivation", "思想道德修养与法律基础", "Humanities"),
    "logic": ("Logic", "逻辑学", "Humanities"),
    "law": ("Law", "法学", "Humanities"),
    "chinese_language_and_literature": ("Chinese Language and Literature", "中国语言文学", "Humanities"),
    "art_studies": ("Art Studies", "艺术学", "Humanities"),
    "professional_tour_guide": ("Professional Tour Guide", "导游资格", "Humanities"),
    "legal_professional": ("Legal Professional", "法律职业资格", "Humanities"),
    "high_school_chinese": ("High School Chinese", "高中语文", "Humanities"),
    "high_school_history": ("High School History", "高中历史", "Humanities"),
    "middle_school_history": ("Middle School History", "初中历史", "Humanities"),
    "civil_servant": ("Civil Servant", "公务员", "Other"),
    "sports_science": ("Sports Science", "体育学", "Other"),
    "plant_protection": ("Plant Protection", "植物保护", "Other"),
    "basic_medicine": ("Basic Medicine", "基础医学", "Other"),
    "clinical_medicine": ("Clinical Medicine", "临床医学", "Other"),
    "urban_and_rural_planner": ("Urban and Rural Planner", "注册城乡规划师", "Other"),
    "accountant": ("Accountant", "注册会计师", "Other"),
    "fire_engineer": ("Fire Engineer", "注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": (
        "Environmental Impact Assessment Engineer", "环境影响评价工程师", "Other"),
    "tax_accountant": ("Tax Accountant", "税务师", "Other"),
    "physician": ("Physician", "医师资格", "Other"),
}

# The subjects behind C-Eval's "Hard" score (the unweighted mean over these 8).
CEVAL_HARD: tuple[str, ...] = (
    "advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_physics",
    "college_chemistry", "high_school_mathematics", "high_school_physics", "high_school_chemistry",
)

# subject -> group key of Qwen's evaluate_mmlu.py; the keys' odd capitalisation is what the script prints.
MMLU_SUBJECTS: dict[str, str] = {
    **dict.fromkeys((
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ), "stem"),
    **dict.fromkeys((
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ), "Humanities"),
    **dict.fromkeys((
        "business_ethics", "college_medicine", "human_aging", "management", "marketing", "medical_genetics",
        "miscellaneous", "nutrition", "professional_accounting", "professional_medicine", "virology",
        "global_facts", "clinical_knowledge",
    ), "other"),
    **dict.fromkeys((
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ), "social"),
}

# CMMLU v1.0.1 file stem -> categories. CMMLU maps each subject to one or two sub-categories and those to the
# categories below; "China specific" is a second label on 15 subjects that also sit in one of the other four.
_STEM, _HUM, _SOC, _OTHER, _CN = "STEM", "Humanities", "Social Science", "Other", "China specific"
CMMLU_SUBJECTS: dict[str, tuple[str, ...]] = {
    "agronomy": (_OTHER,),
    "anatomy": (_STEM,),
    "ancient_chinese": (_SOC, _CN),
    "arts": (_HUM,),
    "astronomy": (_STEM,),
    "business_ethics": (_SOC,),
    "chinese_civil_service_exam": (_SOC, _CN),
    "chinese_driving_rule": (_OTHER, _CN),
    "chinese_food_culture": (_SOC, _CN),
    "chinese_foreign_policy": (_SOC, _CN),
    "chinese_history": (_HUM, _CN),
    "chinese_literature": (_HUM, _CN),
    "chinese_teacher_qualification": (_SOC, _CN),
    "college_actuarial_science": (_STEM,),
    "college_education": (_SOC,),
    "college_engineering_hydrology": (_STEM,),
    "college_law": (_HUM,),
    "college_mathematics": (_STEM,),
    "college_medical_statistics": (_STEM,),
    "clinical_knowledge": (_OTHER,),
    "college_medicine": (_OTHER,),
    "computer_science": (_STEM,),
    "computer_security": (_OTHER,),
    "conceptual_physics": (_STEM,),
    "construction_project_management": (_OTHER, _CN),
    "economics": (_SOC,),
    "education": (_SOC,),
    "elementary_chinese": (_SOC, _CN),
    "elementary_commonsense": (_OTHER, _CN),
    "elementary_information_and_technology": (_OTHER,),
    "electrical_engineering": (_STEM,),
    "elementary_mathematics": (_STEM,),
    "ethnology": (_SOC, _CN),
    "food_science": (_OTHER,),
    "genetics": (_STEM,),
    "global_facts": (_HUM,),
    "high_school_biology": (_STEM,),
    "high_school_chemistry": (_STEM,),
    "high_school_geography": (_SOC,),
    "high_school_mathematics": (_STEM,),
    "high_school_physics": (_STEM,),
    "high_school_politics": (_SOC, _CN),
    "human_sexuality": (_OTHER,),
    "international_law": (_HUM,),
    "journalism": (_SOC,),
    "jurisprudence": (_HUM,),
    "legal_and_moral_basis": (_OTHER,),
    "logical": (_HUM,),
    "machine_learning": (_STEM,),
    "management": (_SOC,),
    "marketing": (_SOC,),
    "marxist_theory": (_HUM,),
    "modern_chinese": (_SOC, _CN),
    "nutrition": (_OTHER,),
    "philosophy": (_HUM,),
    "professional_accounting": (_SOC,),
    "professional_law": (_HUM,),
    "professional_medicine": (_OTHER,),
    "professional_psychology": (_SOC,),
    "public_relations": (_SOC,),
    "security_study": (_SOC,),
    "sociology": (_SOC,),
    "sports_science": (_OTHER,),
    "traditional_chinese_medicine": (_OTHER, _CN),
    "virology": (_STEM,),
    "world_history": (_HUM,),
    "world_religions": (_HUM,),
}


def _group(pairs: Iterable[tuple[str, str]], order: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """(subject, category) pairs -> category -> subjects in table order, categories in print order."""
    pairs = list(pairs)
    return {category: tuple(s for s, c in pairs if c == category) for category in order}


# category -> its subjects, in the order the original scripts print the categories
CEVAL_CATEGORIES: dict[str, tuple[str, ...]] = _group(
    ((s, v[2]) for s, v in CEVAL_SUBJECTS.items()), ("STEM", "Social Science", "Humanities", "Other"))
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = _group(MMLU_SUBJECTS.items(), ("stem", "Humanities", "other", "social"))
CMMLU_CATEGORIES: dict[str, tuple[str, ...]] = _group(
    ((s, c) for s, cs in CMMLU_SUBJECTS.items() for c in cs), (_STEM, _HUM, _SOC, _OTHER, _CN))


def category_members(benchmark: str, category: str) -> tuple[str, ...]:
    """The subjects of ``category`` in ``benchmark`` ("ceval", "mmlu" or "cmmlu"), in table order.

    Raises KeyError naming the known categories, so a typo in a category name fails loudly instead of
    aggregating over nothing.
    """
    table = {"ceval": CEVAL_CATEGORIES, "mmlu": MMLU_CATEGORIES, "cmmlu": CMMLU_CATEGORIES}[benchmark]
    if category not in table:
        raise KeyError(f"{benchmark} has no category {category!r}; known: {', '.join(table)}")
    return table[category]
