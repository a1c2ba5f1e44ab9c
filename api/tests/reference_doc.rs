//! docs/resources.md is generated from the resource types; this test fails
//! when the two drift. Regenerate with
//! `UPDATE_DOCS=1 cargo test -p weft-api --test reference_doc`.

use std::path::PathBuf;

#[test]
fn docs_resources_md_is_up_to_date() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/resources.md");
    let generated = weft_api::docs::reference();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).expect("writing docs/resources.md");
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "docs/resources.md is out of date: run `UPDATE_DOCS=1 cargo test -p weft-api --test reference_doc`"
    );
}

/// docs/policies.md shows the same example of each policy kind as the
/// reference, which the tests parse and validate.
#[test]
fn docs_policies_md_shows_the_checked_examples() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/policies.md");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    for kind in weft_api::Kind::POLICIES {
        let example = weft_api::policy::examples::text(kind);
        assert!(
            on_disk.contains(&format!("```yaml\n{example}```")),
            "docs/policies.md does not show the example of {kind} (api/src/policy/examples.rs)"
        );
        assert!(
            on_disk.contains(&format!("## {kind}\n")),
            "docs/policies.md has no section for {kind}"
        );
    }
}
