"""Look-alike relatives decades apart and stacked routes do not make a link (linkage.decide)."""

from linkage import decide as D
from linkage.evidence import Demographics, MatchWeights, compare
from tests.test_linkage_evidence import T, facts

ALL_ROUTES = ("chest_xr", "chest_ct", "brain_mr", "fundus", "dermoscopy")


def look_alike_pairs(llr=12.0):
    """Every route at the clip: the +20 to +26 nats a PACS-forwarded family reached before."""
    return [D.ImagePair(route, 1, 2, 0.95, llr) for route in ALL_ROUTES]


def test_routes_add_with_falling_weights_and_a_bound():
    assert D.combine_routes([6.0], T) == 6.0
    assert D.combine_routes([4.0, 8.0], T) == 8.0 + 0.5 * 4.0          # strongest first, in full
    assert D.combine_routes([12.0] * 5, T) == T.max_image_total        # 12 + 6 + 3 + 1.5 + 0.75 = 23.25 -> 16
    assert D.combine_routes([-12.0] * 5, T) == -T.max_image_total
    assert D.combine_routes([9.0, -3.0], T) == 9.0 - 1.5
    independent = D.Thresholds(further_route_factor=1.0, max_image_total=100.0)
    assert D.combine_routes([12.0] * 5, independent) == 60.0


def test_relatives_born_decades_apart_are_not_linked_on_images():
    parent = [facts(1, 1, name="DOE^JOHN", birth="19400310", sex="M", age="080Y")]
    child = [facts(2, 2, name="DOE^PETER", birth="19830611", sex="M", age="037Y")]
    d = D.decide_same(parent, child, look_alike_pairs(), MatchWeights(), T)
    assert d.evidence["fields"]["birth_date"]["level"] == "far"
    assert d.evidence["image_weight"] == T.max_image_total
    assert d.band == "withdrawn" and d.probability < 0.01
    # the same images with birth dates that agree are a link: the bound is not what stops it
    twin = [facts(3, 3, name="DOE^JOHN", birth="19400310", sex="M", age="080Y")]
    assert D.decide_same(parent, twin, look_alike_pairs(), MatchWeights(), T).band == "confident"


def test_an_age_that_cannot_match_outweighs_images():
    """No birth dates (a de-identified feed), Patient Age at the study date only."""
    old = [facts(1, 1, name="", birth="", age="078Y", date="20200401")]
    young = [facts(2, 2, name="", birth="", age="035Y", date="20210401")]
    same_age = [facts(3, 3, name="", birth="", age="079Y", date="20210401")]
    far = D.decide_same(old, young, look_alike_pairs(), MatchWeights(), T)
    near = D.decide_same(old, same_age, look_alike_pairs(), MatchWeights(), T)
    assert far.evidence["fields"]["age"]["level"] == "impossible" and far.band == "withdrawn"
    assert near.evidence["fields"]["age"]["level"] == "consistent" and near.band == "confident"


def test_birth_date_levels_and_placeholders():
    def level(a, b):
        return compare(Demographics("A^B", a, "F", None, None), Demographics("A^B", b, "F", None, None),
                       "same")["birth_date"]
    assert level("19800315", "19800316") == "near"             # one digit
    assert level("19800315", "19850720") == "different"        # could be a typing error
    assert level("19800315", "19500101") == "far"
    assert level("19800315", "19000101") == "missing"          # "unknown" placeholder
    # under "belongs" (a misfiled study carries the ID's demographics) far is only "different"
    belongs = compare(Demographics("A^B", "19800315", "F", None, None),
                      Demographics("A^B", "19500101", "F", None, None), "belongs")
    assert belongs["birth_date"] == "different"
    assert MatchWeights().weight("same", "birth_date", "far") < -T.max_image_total
