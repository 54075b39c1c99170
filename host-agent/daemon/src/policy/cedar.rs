//! Compiling a [`Profile`] to a Cedar schema and policy set, and asking Cedar.
//!
//! # What is generated
//! The schema has one action, `call`, on `Tool` resources by `Agent` principals, with the
//! context `{ approved: Bool, args: { <arg>?: String | Long, ... } }`: every argument any tool
//! constrains, with the type its constraint gives it. Each tool `T` on server `S` gives:
//!
//! - `permit` with id `tool:S/T` on `Tool::"S/T"`: the tool is in the profile;
//! - per constrained argument `a`, `forbid` with id `arg:S/T/a.<bound>` *unless* the argument is
//!   present and within its bound (`like "prefix*"` with no `..` segment, encoded or not, and
//!   no backslash; a set's `contains`; `>=`, `<=`);
//! - an argument that any tool of the profile bounds by a `prefix` is a path everywhere in it:
//!   its `one_of` rules carry the same escape guard as its `prefix` rules, so a set value
//!   holding a `..` segment (or an encoding of one) never matches;
//! - with `approval`, `forbid` with id `approval:S/T` and annotation `@approval("why")`
//!   *unless* `context.approved`.
//!
//! A tool not in the profile matches no `permit`: Cedar's default deny, reported as the rule
//! [`DEFAULT_DENY`]. The set is validated against the schema (strict mode) when it is built, so
//! a generator bug is a load error, not a silent allow.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, EntityId, EntityTypeName, EntityUid,
    Policy, PolicyId, PolicySet, Request, Schema, ValidationMode, Validator,
};

use super::profile::{ArgType, Profile};
use super::{Decision, PolicyError};

/// `like` patterns (already escaped for Cedar) that a prefix-constrained argument must not
/// match: a `..` segment, and what an upstream might decode into one (`%2e`, `%2f`, `%5c` in
/// either case, and a backslash).
const PREFIX_ESCAPES: &[&str] = &[
    "*/../*", "*/..", "*%2e*", "*%2E*", "*%2f*", "*%2F*", "*%5c*", "*%5C*", "*\\\\*",
];

/// The literal pieces behind [`PREFIX_ESCAPES`]' `*piece*` patterns.
const ESCAPE_PIECES: &[&str] = &["/../", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\"];

/// Whether `value` matches one of [`PREFIX_ESCAPES`]: the same test in Rust, for comparing
/// profiles (`spawn_excess`) without asking Cedar.
pub(super) fn steps_out(value: &str) -> bool {
    value.ends_with("/..") || ESCAPE_PIECES.iter().any(|piece| value.contains(piece))
}

/// The rule reported when no policy permits the call.
pub const DEFAULT_DENY: &str = "default-deny";

/// A profile compiled to Cedar.
#[derive(Debug)]
pub struct CedarProfile {
    schema: Schema,
    policies: PolicySet,
    authorizer: Authorizer,
    entities: Entities,
    action: EntityUid,
    agent_type: EntityTypeName,
    tool_type: EntityTypeName,
    arg_types: BTreeMap<String, ArgType>,
    /// The generated text, kept for `nanoclaw profile show` and for tests.
    source: String,
}

impl CedarProfile {
    /// Compiles and validates.
    pub fn compile(profile: &Profile) -> Result<Self, PolicyError> {
        let mut arg_types = BTreeMap::new();
        let mut paths = BTreeSet::new();
        for tool in &profile.tools {
            for (arg, c) in &tool.args {
                if let Some(ty) = c.arg_type() {
                    arg_types.insert(arg.clone(), ty);
                }
                if c.prefix.is_some() {
                    paths.insert(arg.as_str());
                }
            }
        }
        let mut schema_src = String::from("entity Agent;\nentity Tool;\n");
        schema_src.push_str(
            "action \"call\" appliesTo {\n  principal: [Agent],\n  resource: [Tool],\n  \
             context: { approved: Bool, args: {",
        );
        for (i, (arg, ty)) in arg_types.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(schema_src, "{sep} {}?: {}", quote(arg), ty.cedar());
        }
        schema_src.push_str(" } }\n};\n");
        let (schema, _warnings) = Schema::from_cedarschema_str(&schema_src)
            .map_err(|e| PolicyError::Cedar(format!("schema: {e}")))?;

        let mut policies = PolicySet::new();
        let mut source = String::new();
        let mut add = |id: String, text: String| -> Result<(), PolicyError> {
            let _ = writeln!(source, "// {id}\n{text}\n");
            let policy = Policy::parse(Some(PolicyId::new(&id)), &text)
                .map_err(|e| PolicyError::Cedar(format!("policy {id}: {e}")))?;
            policies
                .add(policy)
                .map_err(|e| PolicyError::Cedar(format!("policy {id}: {e}")))
        };
        for tool in &profile.tools {
            let key = format!("{}/{}", tool.server, tool.name);
            let scope = format!(
                "principal, action == Action::\"call\", resource == Tool::{}",
                quote(&key)
            );
            add(format!("tool:{key}"), format!("permit({scope});"))?;
            for (arg, c) in &tool.args {
                let attr = format!("context.args[{}]", quote(arg));
                let has = format!("context.args has {}", quote(arg));
                // A `..` path segment would step out from under a prefix, and so would one
                // that an upstream decodes: percent-encoded dots, slashes and backslashes, and
                // backslashes themselves.
                let escapes: String = PREFIX_ESCAPES
                    .iter()
                    .map(|p| format!(" && !({attr} like \"{p}\")"))
                    .collect();
                let mut bounds = Vec::new();
                if let Some(prefix) = &c.prefix {
                    bounds.push((
                        "prefix",
                        format!("{attr} like \"{}*\"{escapes}", like_escape(prefix)),
                    ));
                }
                if let Some(set) = &c.one_of {
                    let items: Vec<String> = set.iter().map(|s| quote(s)).collect();
                    // A set of paths gets the guard too (review finding H1): a value such as
                    // `/data/../etc/shadow` is no safer for being spelt out.
                    let guard = if paths.contains(arg.as_str()) {
                        escapes.as_str()
                    } else {
                        ""
                    };
                    bounds.push((
                        "one_of",
                        format!("[{}].contains({attr}){guard}", items.join(", ")),
                    ));
                }
                if let Some(min) = c.min {
                    bounds.push(("min", format!("{attr} >= {min}")));
                }
                if let Some(max) = c.max {
                    bounds.push(("max", format!("{attr} <= {max}")));
                }
                for (bound, cond) in bounds {
                    add(
                        format!("arg:{key}/{arg}.{bound}"),
                        format!("forbid({scope}) unless {{ {has} && {cond} }};"),
                    )?;
                }
            }
            if let Some(reason) = &tool.approval {
                add(
                    format!("approval:{key}"),
                    format!(
                        "@approval({})\nforbid({scope}) unless {{ context.approved }};",
                        quote(reason)
                    ),
                )?;
            }
        }

        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
            return Err(PolicyError::Cedar(format!(
                "generated policies do not validate: {}",
                errors.join("; ")
            )));
        }
        let entity_type = |name: &str| {
            EntityTypeName::from_str(name).map_err(|e| PolicyError::Cedar(e.to_string()))
        };
        Ok(Self {
            schema,
            policies,
            authorizer: Authorizer::new(),
            entities: Entities::empty(),
            action: EntityUid::from_type_name_and_id(entity_type("Action")?, EntityId::new("call")),
            agent_type: entity_type("Agent")?,
            tool_type: entity_type("Tool")?,
            arg_types,
            source,
        })
    }

    /// The generated Cedar text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Decides a call of `tool` on `server` by `agent` with `args` (the JSON object the agent
    /// sent, restored). `approved` says whether the user has approved this exact call.
    pub fn decide(
        &self,
        agent: &str,
        server: &str,
        tool: &str,
        args: &serde_json::Map<String, serde_json::Value>,
        approved: bool,
    ) -> Result<Decision, PolicyError> {
        let mut cedar_args = serde_json::Map::new();
        for (name, value) in args {
            let Some(ty) = self.arg_types.get(name) else {
                continue;
            };
            let typed = match (ty, value) {
                (ArgType::String, serde_json::Value::String(_)) => value.clone(),
                (ArgType::Long, serde_json::Value::Number(n)) if n.as_i64().is_some() => {
                    value.clone()
                }
                _ => {
                    return Ok(Decision::Deny {
                        rule: format!("arg:{server}/{tool}/{name}.type"),
                        reason: format!(
                            "argument `{name}` must be a {}",
                            match ty {
                                ArgType::String => "string",
                                ArgType::Long => "64-bit integer",
                            }
                        ),
                    });
                }
            };
            cedar_args.insert(name.clone(), typed);
        }
        let context = Context::from_json_value(
            serde_json::json!({ "approved": approved, "args": cedar_args }),
            Some((&self.schema, &self.action)),
        )
        .map_err(|e| PolicyError::Cedar(format!("context: {e}")))?;
        let principal =
            EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(agent));
        let resource = EntityUid::from_type_name_and_id(
            self.tool_type.clone(),
            EntityId::new(format!("{server}/{tool}")),
        );
        let request = Request::new(
            principal,
            self.action.clone(),
            resource,
            context,
            Some(&self.schema),
        )
        .map_err(|e| PolicyError::Cedar(format!("request: {e}")))?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, &self.entities);
        if let Some(e) = response.diagnostics().errors().next() {
            // An evaluation error makes Cedar skip that policy; a skipped forbid must not
            // turn into an allow, so any error denies.
            return Ok(Decision::Deny {
                rule: "evaluation-error".into(),
                reason: format!("the policy could not be evaluated: {e}"),
            });
        }
        let mut reasons: Vec<&PolicyId> = response.diagnostics().reason().collect();
        reasons.sort_by_key(|id| id.to_string());
        match response.decision() {
            CedarDecision::Allow => {
                let rule = reasons
                    .first()
                    .map(|id| id.to_string())
                    .unwrap_or_else(|| format!("tool:{server}/{tool}"));
                Ok(Decision::Allow { rule })
            }
            CedarDecision::Deny if reasons.is_empty() => Ok(Decision::Deny {
                rule: DEFAULT_DENY.into(),
                reason: format!("tool `{tool}` is not in the profile"),
            }),
            CedarDecision::Deny => {
                let hard = reasons
                    .iter()
                    .find(|id| self.policies.annotation(id, "approval").is_none());
                match hard {
                    Some(id) => Ok(Decision::Deny {
                        rule: id.to_string(),
                        reason: describe_forbid(id.as_ref()),
                    }),
                    None => {
                        let id = reasons[0];
                        Ok(Decision::NeedsApproval {
                            rule: id.to_string(),
                            reason: self
                                .policies
                                .annotation(id, "approval")
                                .unwrap_or("needs approval")
                                .to_owned(),
                        })
                    }
                }
            }
        }
    }
}

/// Words for a generated `forbid`'s id (`arg:S/T/a.prefix`).
fn describe_forbid(id: &str) -> String {
    match id.rsplit_once('/').and_then(|(_, a)| a.rsplit_once('.')) {
        Some((arg, "prefix")) => format!("argument `{arg}` is missing or outside its prefix"),
        Some((arg, "one_of")) => format!("argument `{arg}` is missing or not an allowed value"),
        Some((arg, "min")) => format!("argument `{arg}` is missing or below its minimum"),
        Some((arg, "max")) => format!("argument `{arg}` is missing or over its maximum"),
        _ => "forbidden by the profile".into(),
    }
}

/// A Cedar string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    out.push('"');
    out
}

/// The inside of a `like` pattern matching `s` literally (`*` escaped too).
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '*' {
            out.push_str("\\*");
        } else {
            push_escaped(&mut out, c);
        }
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        c if c.is_control() || !c.is_ascii() => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}
