"""Hypothesis strategies shared by the parser property tests and the fuzz tests of the app."""

from __future__ import annotations

from hypothesis import strategies as st

from deployments.ingress.protocol import ImageGenerationRequest

# Any JSON value, nested a little (NaN and Infinity are not JSON).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    # Lone UTF-16 surrogates: valid in JSON, not encodable as UTF-8.
    | st.text(st.characters(categories=["Cs", "Ll"]), max_size=4),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

# Request bodies made of the request's own field names (and one it does not have), with any
# values: mostly wrong types and bounds, sometimes valid.
request_bodies = st.dictionaries(
    st.sampled_from([*ImageGenerationRequest.model_fields, "unknown"]), json_values, max_size=6
)


@st.composite
def _size(draw, multiple: int, max_pixels: int) -> str:
    if draw(st.integers(0, 4)) == 0:
        return "auto"
    width = draw(st.integers(1, max_pixels // multiple // multiple)) * multiple
    height = draw(st.integers(1, max(1, max_pixels // width // multiple))) * multiple
    return f"{width}x{height}"


def plausible_request_bodies(
    *, model: str, multiple: int, max_pixels: int, max_steps: int, max_images: int
):
    """Bodies that a careful client would send to a service with these limits: a prompt and
    any of the other fields, each with a value in its range. Nearly all of them pass
    validation, so a test that mixes them with `request_bodies` can require a real share of
    its cases to get as far as generating (a service that refused everything would pass a
    test made of junk bodies alone)."""
    optional = {
        "model": st.just(model),
        "n": st.integers(1, max_images),
        "background": st.sampled_from(["opaque", "auto"]),
        "output_format": st.sampled_from(["png", "jpeg", "webp"]),
        "quality": st.sampled_from(["auto", "standard", "hd", "low", "medium", "high"]),
        "response_format": st.sampled_from(["url", "b64_json"]),
        "size": _size(multiple, max_pixels),
        "moderation": st.just("auto"),
        "user": st.text(max_size=20),
        "seed": st.integers(0, 2**32 - 1),
        "negative_prompt": st.text(max_size=20),
        "num_inference_steps": st.integers(1, max_steps),
        "guidance_scale": st.floats(0, 20),
    }
    prompts = st.text(min_size=1, max_size=40).filter(lambda text: text.strip())
    return st.fixed_dictionaries({"prompt": prompts}, optional=optional)
