//! The README's enforcement-target snippets are valid configuration: each parses and builds.

use std::sync::Arc;

use meshguard_enforcer::MemoryDeadLetters;
use meshguard_enforcer::targets::{self, TargetConfig, TargetContext};
use serde::Deserialize;

#[derive(Deserialize)]
struct Snippet {
    enforcer: Enforcer,
}

#[derive(Deserialize)]
struct Enforcer {
    targets: Vec<TargetConfig>,
}

#[test]
fn every_target_snippet_of_the_readme_parses_and_builds() {
    let readme = include_str!("../../README.md");
    let section = readme.split("\n## Enforcement targets\n").nth(1).expect("the README has the section");
    let section = section.split("\n## ").next().expect("non-empty");
    let snippets: Vec<&str> = section.split("```toml\n").skip(1).map(|block| block.split("```").next().expect("closed block")).collect();
    assert_eq!(snippets.len(), TargetConfig::TYPES.len(), "one snippet per target type");
    let context = TargetContext { dead_letters: Arc::new(MemoryDeadLetters::new()) };
    let mut types = Vec::new();
    for snippet in snippets {
        let parsed: Snippet = toml::from_str(snippet).unwrap_or_else(|e| panic!("README snippet does not parse: {e}\n{snippet}"));
        for config in &parsed.enforcer.targets {
            targets::build(config, &context).unwrap_or_else(|e| panic!("README snippet does not build: {e}\n{snippet}"));
            types.push(snippet.lines().find_map(|l| l.strip_prefix("type = ")).expect("a type line").trim_matches('"'));
        }
    }
    assert_eq!(types, TargetConfig::TYPES);
}
