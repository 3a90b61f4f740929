//! Model ids. A suite's model entry has an id of letters, digits, `-`, `_`
//! and `.`; what handoff derives from an entry is named after it: `ID@VARIANT`
//! for a precision variant, `ID+lowered` for a lowered copy. Every crate that
//! takes a case's model apart (pairs, reports, the A/B gate) uses these, so
//! they agree on what belongs to which entry.

/// What a name must be made of, as an error message says it.
pub const NAME_RULE: &str = "use only letters, digits, `-`, `_` and `.` (`@` and `+` name a model's variants and lowered copies, `/` separates the parts of a case id)";

/// Whether `s` is a valid model id, group or suite name.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// The id of `entry`'s precision variant `name`.
pub fn variant_id(entry: &str, name: &str) -> String {
    format!("{entry}@{name}")
}

/// The id of the lowered copy of `model`.
pub fn lowered_id(model: &str) -> String {
    format!("{model}+lowered")
}

/// The precision variant `model` is, if it is one: `int8-dynamic` for
/// `m@int8-dynamic`.
pub fn variant(model: &str) -> Option<&str> {
    model.split_once('@').map(|(_, v)| v)
}

/// The model `model` is the lowered copy of, if it is one: `m` for
/// `m+lowered`, `m@int8-dynamic` for `m@int8-dynamic+lowered`.
pub fn lowered_from(model: &str) -> Option<&str> {
    model.strip_suffix("+lowered")
}

/// A model id as the entry it comes from and what was derived from it:
/// `("m", "@int8-dynamic")`, `("m", "+lowered")`, `("m", "")`.
pub fn split(model: &str) -> (&str, &str) {
    model
        .find(['@', '+'])
        .map_or((model, ""), |i| model.split_at(i))
}

/// What `model` is of the entry `entry`: `Some("")` the entry itself,
/// `Some("@int8-dynamic")` one of its variants, `None` another entry's
/// (`m.base2` is not a form of `m.base`).
pub fn form_of<'a>(model: &'a str, entry: &str) -> Option<&'a str> {
    let (e, form) = split(model);
    (e == entry).then_some(form)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_split_into_entry_and_form() {
        assert_eq!(split("minilm-l6"), ("minilm-l6", ""));
        assert_eq!(split("m.base@int8-dynamic"), ("m.base", "@int8-dynamic"));
        assert_eq!(split("m+lowered"), ("m", "+lowered"));
        assert_eq!(form_of("m.base@fp16", "m.base"), Some("@fp16"));
        assert_eq!(form_of("m.base", "m.base"), Some(""));
        assert_eq!(form_of("m.base2", "m.base"), None);
        assert_eq!(form_of("m", "m.base"), None);
        assert_eq!(
            variant(&variant_id("m", "int8-dynamic")),
            Some("int8-dynamic")
        );
        assert_eq!(variant("m"), None);
        assert_eq!(lowered_from(&lowered_id("m@fp16")), Some("m@fp16"));
        assert_eq!(lowered_from("m"), None);
        assert!(is_name("bert_base-v1.2"));
        assert!(!is_name("a@b") && !is_name("a b") && !is_name("a/b") && !is_name(""));
    }
}
