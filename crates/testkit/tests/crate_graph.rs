//! The crate graph keeps test code out of the product (ARCHITECTURE.md,
//! "Crates"): no product crate builds the test kit into itself, none depends
//! on the harness in any way (the harness depends on every server, so even a
//! dev edge closes a loop), and the test kit sits below the servers that test
//! with it. A failure prints each offending edge, or path, with its reason.
//!
//! The graph is `cargo metadata`'s resolved one, so a rule also catches an
//! edge that goes through another workspace crate. After the first edge only
//! normal and build edges count: a dependency's own dev-dependencies are never
//! built into its dependents.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;

const TESTKIT: &str = "cellmon-testkit";
const HARNESS: &str = "cellmon-harness";
const PRODUCT: [&str; 7] = [
    "cellmon-domain",
    "cellmon-bus",
    "cellmon-store",
    "cellmon-service",
    "cellmon-ingest",
    "cellmon-persister",
    "cellmon-gateway",
];
const SERVERS: [&str; 3] = ["cellmon-ingest", "cellmon-persister", "cellmon-gateway"];
/// Crates the check must find, so that a rename cannot make it pass by
/// checking nothing. The persister is being split out of the ingest crate
/// and is checked once it exists.
const EXPECTED: [&str; 8] = [
    "cellmon-domain",
    "cellmon-bus",
    "cellmon-store",
    "cellmon-service",
    "cellmon-ingest",
    "cellmon-gateway",
    TESTKIT,
    HARNESS,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Normal,
    Build,
    Dev,
}

impl Kind {
    /// What ends up compiled into the crate itself, as opposed to its tests.
    fn ships(self) -> bool {
        matches!(self, Kind::Normal | Kind::Build)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Normal => "normal",
            Kind::Build => "build",
            Kind::Dev => "dev",
        })
    }
}

/// Package name to its direct dependencies (name, kind). Names are enough:
/// two versions of one registry crate can only merge paths between registry
/// crates, which never lead back into the workspace.
#[derive(Debug, Default)]
struct Graph {
    edges: BTreeMap<String, BTreeSet<(String, Kind)>>,
}

impl Graph {
    fn from_edges<'a>(edges: impl IntoIterator<Item = (&'a str, &'a str, Kind)>) -> Self {
        let mut graph = Self::default();
        for (from, to, kind) in edges {
            graph.add(from, to, kind);
        }
        graph
    }

    fn add(&mut self, from: &str, to: &str, kind: Kind) {
        self.edges
            .entry(from.to_owned())
            .or_default()
            .insert((to.to_owned(), kind));
        self.edges.entry(to.to_owned()).or_default();
    }

    fn contains(&self, name: &str) -> bool {
        self.edges.contains_key(name)
    }

    /// The shortest path from `from` to `to` whose first edge is of a kind
    /// `first` accepts and whose other edges ship, as `a -[kind]-> b ...`.
    fn path(&self, from: &str, to: &str, first: impl Fn(Kind) -> bool) -> Option<String> {
        let mut came_from: BTreeMap<&str, (&str, Kind)> = BTreeMap::new();
        let mut queue = VecDeque::from([from]);
        while let Some(node) = queue.pop_front() {
            for (next, kind) in self.edges.get(node).into_iter().flatten() {
                let allowed = if node == from {
                    first(*kind)
                } else {
                    kind.ships()
                };
                if !allowed || next == from || came_from.contains_key(next.as_str()) {
                    continue;
                }
                came_from.insert(next, (node, *kind));
                if next == to {
                    return Some(render_path(&came_from, from, to));
                }
                queue.push_back(next);
            }
        }
        None
    }
}

fn render_path(came_from: &BTreeMap<&str, (&str, Kind)>, from: &str, to: &str) -> String {
    let mut hops = Vec::new();
    let mut node = to;
    while node != from {
        let (previous, kind) = came_from[node];
        hops.push(format!(" -[{kind}]-> {node}"));
        node = previous;
    }
    hops.reverse();
    format!("{from}{}", hops.concat())
}

/// Every forbidden edge (or path) in `graph`, one line each with its reason.
fn violations(graph: &Graph) -> Vec<String> {
    let present = |names: &[&'static str]| -> Vec<&'static str> {
        names
            .iter()
            .copied()
            .filter(|name| graph.contains(name))
            .collect()
    };
    let any_kind = |_: Kind| true;
    let mut found = Vec::new();
    for product in present(&PRODUCT) {
        if let Some(path) = graph.path(product, TESTKIT, Kind::ships) {
            found.push(format!(
                "{path}: a product crate builds the test kit into itself (use a dev-dependency)"
            ));
        }
        if let Some(path) = graph.path(product, HARNESS, any_kind) {
            found.push(format!(
                "{path}: a product crate depends on the harness, which depends on every server"
            ));
        }
    }
    if graph.contains(TESTKIT) {
        for server in present(&SERVERS).into_iter().chain([HARNESS]) {
            if let Some(path) = graph.path(TESTKIT, server, any_kind) {
                found.push(format!(
                    "{path}: the test kit sits below the servers and the harness that use it"
                ));
            }
        }
    }
    found
}

#[derive(Debug, Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    resolve: Resolve,
}

#[derive(Debug, Deserialize)]
struct Package {
    id: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct Resolve {
    nodes: Vec<Node>,
}

#[derive(Debug, Deserialize)]
struct Node {
    id: String,
    deps: Vec<NodeDep>,
}

#[derive(Debug, Deserialize)]
struct NodeDep {
    pkg: String,
    dep_kinds: Vec<DepKind>,
}

#[derive(Debug, Deserialize)]
struct DepKind {
    /// `null` for a normal dependency, else `"dev"` or `"build"`.
    kind: Option<String>,
}

fn workspace_graph() -> anyhow::Result<Graph> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(&root)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "cargo metadata failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Metadata = serde_json::from_slice(&output.stdout)?;
    let names: BTreeMap<&str, &str> = metadata
        .packages
        .iter()
        .map(|package| (package.id.as_str(), package.name.as_str()))
        .collect();
    let name = |id: &str| {
        names
            .get(id)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("cargo metadata names no package {id}"))
    };
    let mut graph = Graph::default();
    for node in &metadata.resolve.nodes {
        let from = name(&node.id)?;
        for dep in &node.deps {
            let to = name(&dep.pkg)?;
            for kind in &dep.dep_kinds {
                let kind = match kind.kind.as_deref() {
                    None => Kind::Normal,
                    Some("build") => Kind::Build,
                    Some("dev") => Kind::Dev,
                    Some(other) => anyhow::bail!("unknown dependency kind {other:?}"),
                };
                graph.add(from, to, kind);
            }
        }
    }
    Ok(graph)
}

#[test]
fn product_crates_keep_the_test_kit_and_the_harness_out() -> anyhow::Result<()> {
    let graph = workspace_graph()?;
    let missing: Vec<_> = EXPECTED
        .into_iter()
        .filter(|name| !graph.contains(name))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "cargo metadata has no {missing:?}: renamed? update this test's lists"
    );
    let found = violations(&graph);
    anyhow::ensure!(
        found.is_empty(),
        "forbidden dependencies:\n  {}",
        found.join("\n  ")
    );
    Ok(())
}

#[test]
fn an_edge_through_another_crate_is_reported_with_its_path() {
    let graph = Graph::from_edges([
        ("cellmon-store", "cellmon-fixtures", Kind::Build),
        ("cellmon-fixtures", TESTKIT, Kind::Normal),
    ]);
    assert_eq!(
        violations(&graph),
        [
            "cellmon-store -[build]-> cellmon-fixtures -[normal]-> cellmon-testkit: \
             a product crate builds the test kit into itself (use a dev-dependency)"
        ]
    );
}

#[test]
fn dev_edges_count_for_the_harness_and_the_servers_but_not_for_the_test_kit() {
    let graph = Graph::from_edges([
        // Allowed: this is what the test kit is for, and a dependency's
        // dev-dependencies are not built into its dependents.
        ("cellmon-bus", TESTKIT, Kind::Dev),
        ("cellmon-ingest", "cellmon-bus", Kind::Normal),
        (TESTKIT, "cellmon-store", Kind::Normal),
        // Forbidden whatever the kind.
        ("cellmon-gateway", HARNESS, Kind::Dev),
        (TESTKIT, "cellmon-ingest", Kind::Dev),
    ]);
    assert_eq!(
        violations(&graph),
        [
            "cellmon-gateway -[dev]-> cellmon-harness: \
             a product crate depends on the harness, which depends on every server",
            "cellmon-testkit -[dev]-> cellmon-ingest: \
             the test kit sits below the servers and the harness that use it",
        ]
    );
}
