//! Applies the ValidatingAdmissionPolicies of a manifest file to an admission request the way
//! kube-apiserver's policy plugin does, with a CEL interpreter (cel-rust) instead of cel-go:
//! `matchConstraints.resourceRules` select the request, `matchConditions` all have to be true,
//! `variables` are evaluated in order into `variables.<name>`, every validation must be true, and an
//! evaluation error counts as a denial under `failurePolicy: Fail`. Only policies that a
//! `ValidatingAdmissionPolicyBinding` binds with the `Deny` action decide.
//!
//! The `request`, `object` and `oldObject` variables are built as the API server builds them: the
//! `admission.k8s.io/v1` AdmissionRequest and the objects as JSON (fields left out when empty, as
//! `omitempty` does), `oldObject` null on CREATE.
//!
//! Not modelled: cel-go's type checking against the OpenAPI schema (the API server reports it as
//! warnings in the policy's status), cost limits, `params`, `auditAnnotations`, `matchResources` of
//! bindings (the bindings here have none), Kubernetes' CEL libraries (quantity, IP …; the policies
//! do not use them).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cel::{Context, Env, Program, Value};
use serde_json::{Value as Json, json};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not YAML: {source}")]
    Yaml {
        file: String,
        #[source]
        source: serde_norway::Error,
    },
    #[error("{file}: {policy}: {field}: {what}")]
    Field {
        file: String,
        policy: String,
        field: String,
        what: String,
    },
}

/// What the policies say about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No bound policy selects the request (wrong resource, or a matchCondition is false).
    NotMatched,
    Allowed,
    /// The messages of every failed validation (or evaluation error).
    Denied(Vec<String>),
}

impl Decision {
    pub fn is_denied(&self) -> bool {
        matches!(self, Decision::Denied(_))
    }
}

/// One admission request, as the API server describes it to a policy.
#[derive(Debug, Clone)]
pub struct Request {
    pub operation: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    /// Empty for the main resource, e.g. `status` for `nodes/status`.
    pub sub_resource: String,
    pub kind: String,
    pub name: String,
    pub username: String,
    pub groups: Vec<String>,
    pub extra: Vec<(String, Vec<String>)>,
    /// Null on DELETE.
    pub object: Json,
    /// Null on CREATE.
    pub old_object: Json,
}

impl Request {
    /// The `request` variable: an `admission.k8s.io/v1` AdmissionRequest as JSON.
    pub fn to_json(&self) -> Json {
        let gvk = json!({"group": self.group, "version": self.version, "kind": self.kind});
        let gvr = json!({"group": self.group, "version": self.version, "resource": self.resource});
        let mut user = json!({
            "username": self.username,
            "uid": "0b6c6d3a-0000-4000-8000-00000000000a",
            "groups": self.groups,
        });
        if !self.extra.is_empty() {
            user["extra"] = self
                .extra
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<serde_json::Map<String, Json>>()
                .into();
        }
        let mut r = json!({
            "uid": "7d0c1f9e-0000-4000-8000-0000000000aa",
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": self.name,
            "operation": self.operation,
            "userInfo": user,
            "dryRun": false,
        });
        if !self.sub_resource.is_empty() {
            r["subResource"] = json!(self.sub_resource);
            r["requestSubResource"] = json!(self.sub_resource);
        }
        r
    }
}

/// JSON → CEL value. Integers become `int` as cel-go makes them from unstructured objects (cel-rust's
/// serde path would make them `uint`).
pub fn to_cel(v: &Json) -> Value {
    match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(a) => Value::List(Arc::new(a.iter().map(to_cel).collect())),
        Json::Object(m) => Value::from(
            m.iter()
                .map(|(k, v)| (k.clone(), to_cel(v)))
                .collect::<HashMap<String, Value>>(),
        ),
    }
}

#[derive(Debug)]
struct Rule {
    api_groups: Vec<String>,
    api_versions: Vec<String>,
    resources: Vec<String>,
    operations: Vec<String>,
}

impl Rule {
    fn matches(&self, r: &Request) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        let resource = if r.sub_resource.is_empty() {
            r.resource.clone()
        } else {
            format!("{}/{}", r.resource, r.sub_resource)
        };
        any(&self.api_groups, &r.group)
            && any(&self.api_versions, &r.version)
            && any(&self.operations, &r.operation)
            && self.resources.iter().any(|x| {
                *x == resource
                    || (x == "*" && r.sub_resource.is_empty())
                    || x == "*/*"
                    || x.strip_prefix("*/") == Some(r.sub_resource.as_str())
                    || x.strip_suffix("/*") == Some(r.resource.as_str())
            })
    }
}

#[derive(Debug)]
struct Validation {
    expression: String,
    program: Program,
    message: Option<String>,
    message_expression: Option<Program>,
}

/// One ValidatingAdmissionPolicy, compiled.
#[derive(Debug)]
pub struct Policy {
    pub name: String,
    fail_closed: bool,
    rules: Vec<Rule>,
    match_conditions: Vec<(String, Program)>,
    variables: Vec<(String, Program)>,
    validations: Vec<Validation>,
}

/// Every expression of the policy, for checks on the text (e.g. which taint key it names).
impl Policy {
    pub fn expressions(&self) -> Vec<&str> {
        self.validations
            .iter()
            .map(|v| v.expression.as_str())
            .collect()
    }

    fn evaluate(&self, env: &Arc<Env>, req: &Request) -> Decision {
        if !self.rules.iter().any(|r| r.matches(req)) {
            return Decision::NotMatched;
        }
        let mut ctx = Context::with_env(env.clone());
        ctx.add_variable_from_value("request", to_cel(&req.to_json()));
        ctx.add_variable_from_value("object", to_cel(&req.object));
        ctx.add_variable_from_value("oldObject", to_cel(&req.old_object));
        ctx.add_variable_from_value("variables", Value::from(HashMap::<String, Value>::new()));
        // The API server: any false condition skips the policy; otherwise an error is a failure.
        let mut condition_error = None;
        for (name, program) in &self.match_conditions {
            match program.execute(&ctx) {
                Ok(Value::Bool(false)) => return Decision::NotMatched,
                Ok(Value::Bool(true)) => {}
                Ok(other) => condition_error = Some(format!("matchCondition {name}: {other:?}")),
                Err(e) => condition_error = Some(format!("matchCondition {name}: {e}")),
            }
        }
        if let Some(e) = condition_error {
            return self.failure(vec![e]);
        }
        // Variables are lazy in the API server: one that fails only fails the validations using it.
        // Leaving it out of `variables` does exactly that (they fail with "no such key").
        let mut vars: HashMap<String, Value> = HashMap::new();
        for (name, program) in &self.variables {
            if let Ok(v) = program.execute(&ctx) {
                vars.insert(name.clone(), v);
            }
            ctx.add_variable_from_value("variables", Value::from(vars.clone()));
        }
        let mut denied = Vec::new();
        let mut errors = Vec::new();
        for v in &self.validations {
            match v.program.execute(&ctx) {
                Ok(Value::Bool(true)) => {}
                Ok(Value::Bool(false)) => {
                    let from_expr = v
                        .message_expression
                        .as_ref()
                        .and_then(|m| m.execute(&ctx).ok())
                        .and_then(|m| match m {
                            Value::String(s) if !s.trim().is_empty() => Some(s.to_string()),
                            _ => None,
                        });
                    denied.push(
                        from_expr
                            .or_else(|| v.message.clone())
                            .unwrap_or_else(|| format!("failed expression: {}", v.expression)),
                    );
                }
                Ok(other) => errors.push(format!("{}: not a bool: {other:?}", v.expression)),
                Err(e) => errors.push(format!("{}: {e}", v.expression)),
            }
        }
        if !errors.is_empty() {
            let mut d = match self.failure(errors) {
                Decision::Denied(d) => d,
                _ => Vec::new(),
            };
            denied.append(&mut d);
        }
        if denied.is_empty() {
            Decision::Allowed
        } else {
            Decision::Denied(denied)
        }
    }

    fn failure(&self, errors: Vec<String>) -> Decision {
        if self.fail_closed {
            Decision::Denied(
                errors
                    .into_iter()
                    .map(|e| format!("policy {} evaluation error: {e}", self.name))
                    .collect(),
            )
        } else {
            Decision::Allowed
        }
    }
}

/// The bound policies of one manifest file.
pub struct PolicySet {
    env: Arc<Env>,
    pub policies: Vec<Policy>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("policies", &self.policies)
            .finish_non_exhaustive()
    }
}

impl PolicySet {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// `file` only names the source in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, PolicyError> {
        let mut docs = Vec::new();
        for d in serde_norway::Deserializer::from_str(text) {
            let v: Json =
                serde::Deserialize::deserialize(d).map_err(|source| PolicyError::Yaml {
                    file: file.to_owned(),
                    source,
                })?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        let env = Arc::new(Env::stdlib());
        let bound: Vec<&str> = docs
            .iter()
            .filter(|d| {
                d["kind"] == "ValidatingAdmissionPolicyBinding"
                    && d["spec"]["validationActions"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "Deny"))
            })
            .filter_map(|d| d["spec"]["policyName"].as_str())
            .collect();
        let mut policies = Vec::new();
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
        {
            let name = d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if !bound.contains(&name.as_str()) {
                continue;
            }
            policies.push(compile(file, &env, &name, &d["spec"])?);
        }
        Ok(Self { env, policies })
    }

    /// Denied if any bound policy denies; allowed if one selected the request and none denied.
    pub fn admit(&self, req: &Request) -> Decision {
        let mut matched = false;
        let mut denied = Vec::new();
        for p in &self.policies {
            match p.evaluate(&self.env, req) {
                Decision::NotMatched => {}
                Decision::Allowed => matched = true,
                Decision::Denied(mut d) => denied.append(&mut d),
            }
        }
        if !denied.is_empty() {
            Decision::Denied(denied)
        } else if matched {
            Decision::Allowed
        } else {
            Decision::NotMatched
        }
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }
}

fn compile(file: &str, env: &Env, policy: &str, spec: &Json) -> Result<Policy, PolicyError> {
    let err = |field: String, what: String| PolicyError::Field {
        file: file.to_owned(),
        policy: policy.to_owned(),
        field,
        what,
    };
    let cel = |field: String, v: &Json| -> Result<Program, PolicyError> {
        let src = v
            .as_str()
            .ok_or_else(|| err(field.clone(), "missing or not a string".into()))?;
        env.compile(src)
            .map_err(|e| err(field, format!("CEL does not parse: {e}")))
    };
    let strings = |v: &Json| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let list = |field: &str| spec[field].as_array().cloned().unwrap_or_default();

    let rules: Vec<Rule> = spec["matchConstraints"]["resourceRules"]
        .as_array()
        .ok_or_else(|| err("matchConstraints.resourceRules".into(), "missing".into()))?
        .iter()
        .map(|r| Rule {
            api_groups: strings(&r["apiGroups"]),
            api_versions: strings(&r["apiVersions"]),
            resources: strings(&r["resources"]),
            operations: strings(&r["operations"]),
        })
        .collect();
    let mut match_conditions = Vec::new();
    for (i, c) in list("matchConditions").iter().enumerate() {
        let name = c["name"].as_str().unwrap_or_default().to_owned();
        let p = cel(format!("matchConditions[{i}].expression"), &c["expression"])?;
        match_conditions.push((name, p));
    }
    let mut variables = Vec::new();
    for (i, v) in list("variables").iter().enumerate() {
        let name = v["name"]
            .as_str()
            .ok_or_else(|| err(format!("variables[{i}].name"), "missing".into()))?
            .to_owned();
        variables.push((
            name,
            cel(format!("variables[{i}].expression"), &v["expression"])?,
        ));
    }
    let mut validations = Vec::new();
    for (i, v) in list("validations").iter().enumerate() {
        let field = format!("validations[{i}]");
        validations.push(Validation {
            expression: v["expression"].as_str().unwrap_or_default().to_owned(),
            program: cel(format!("{field}.expression"), &v["expression"])?,
            message: v["message"].as_str().map(str::to_owned),
            message_expression: match &v["messageExpression"] {
                Json::Null => None,
                m => Some(cel(format!("{field}.messageExpression"), m)?),
            },
        });
    }
    if validations.is_empty() {
        return Err(err(
            "validations".into(),
            "none: the policy checks nothing".into(),
        ));
    }
    Ok(Policy {
        name: policy.to_owned(),
        // The API server's default is Fail.
        fail_closed: spec["failurePolicy"].as_str().unwrap_or("Fail") == "Fail",
        rules,
        match_conditions,
        variables,
        validations,
    })
}
