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
