//! The Varlink envelope: a call names a method and carries parameters; a reply carries
//! parameters, `continues` for a streamed partial reply, or an error name.
//!
//! Only the generic shapes and the standard `org.varlink.service` interface live here; the
//! `io.imgcrypt` methods are in [`crate::api`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[cfg(test)]
pub(crate) mod grammar;

/// The standard interface every Varlink service implements.
pub const SERVICE_INTERFACE: &str = "org.varlink.service";
/// `org.varlink.service.GetInfo`.
pub const GET_INFO: &str = "org.varlink.service.GetInfo";
/// `org.varlink.service.GetInterfaceDescription`.
pub const GET_INTERFACE_DESCRIPTION: &str = "org.varlink.service.GetInterfaceDescription";

/// The description of `org.varlink.service` itself, as the Varlink specification defines it.
pub const SERVICE_DESCRIPTION: &str = "\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
";

/// Standard error names.
pub mod errors {
    /// The named interface is not served here.
    pub const INTERFACE_NOT_FOUND: &str = "org.varlink.service.InterfaceNotFound";
    /// The named method does not exist.
    pub const METHOD_NOT_FOUND: &str = "org.varlink.service.MethodNotFound";
    /// A parameter is missing, mistyped or out of range.
    pub const INVALID_PARAMETER: &str = "org.varlink.service.InvalidParameter";
    /// The caller may not use this method.
    pub const PERMISSION_DENIED: &str = "org.varlink.service.PermissionDenied";
}

/// A method call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// Fully qualified method name, `interface.Method`.
    pub method: String,
    /// The method's input object; absent means `{}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// The caller accepts several replies (`continues: true` on all but the last).
    #[serde(default, skip_serializing_if = "is_false")]
    pub more: bool,
    /// The caller wants no reply at all.
    #[serde(default, skip_serializing_if = "is_false")]
    pub oneway: bool,
    /// Protocol upgrade; never supported here.
    #[serde(default, skip_serializing_if = "is_false")]
    pub upgrade: bool,
}

/// A reply: either parameters or an error, possibly one of several (`continues`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Reply {
    /// The method's output object, or the error's parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// More replies to this call follow.
    #[serde(default, skip_serializing_if = "is_false")]
    pub continues: bool,
    /// Fully qualified error name when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A final successful reply.
    pub fn ok(parameters: impl Serialize) -> Self {
        Self {
            parameters: Some(to_value(parameters)),
            ..Self::default()
        }
    }

    /// A partial reply: more follow.
    pub fn partial(parameters: impl Serialize) -> Self {
        Self {
            parameters: Some(to_value(parameters)),
            continues: true,
            error: None,
        }
    }

    /// An error reply.
    pub fn error(name: impl Into<String>, parameters: impl Serialize) -> Self {
        Self {
            parameters: Some(to_value(parameters)),
            continues: false,
            error: Some(name.into()),
        }
    }
}

/// Output of `org.varlink.service.GetInfo`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceInfo {
    /// Who makes the service.
    pub vendor: String,
    /// The program.
    pub product: String,
    /// Its version.
    pub version: String,
    /// Where to read about it.
    pub url: String,
    /// Interfaces served.
    pub interfaces: Vec<String>,
}

/// Input of `org.varlink.service.GetInterfaceDescription`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InterfaceQuery {
    /// Interface name.
    pub interface: String,
}

/// Output of `org.varlink.service.GetInterfaceDescription`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InterfaceDescription {
    /// The interface definition text.
    pub description: String,
}

fn to_value(parameters: impl Serialize) -> Value {
    serde_json::to_value(parameters).expect("protocol types always serialise")
}

fn is_false(value: &bool) -> bool {
    !*value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_round_trips_in_varlink_shape() {
        let text = r#"{"method":"io.imgcrypt.Encrypt","parameters":{"source":0},"more":true}"#;
        let call: Call = serde_json::from_str(text).unwrap();
        assert_eq!(call.method, "io.imgcrypt.Encrypt");
        assert!(call.more);
        assert_eq!(serde_json::to_string(&call).unwrap(), text);
    }

    #[test]
    fn unknown_envelope_fields_are_rejected() {
        assert!(serde_json::from_str::<Call>(r#"{"method":"a.B","bogus":1}"#).is_err());
    }

    #[test]
    fn partial_reply_sets_continues() {
        let text = serde_json::to_string(&Reply::partial(serde_json::json!({"n": 1}))).unwrap();
        assert_eq!(text, r#"{"parameters":{"n":1},"continues":true}"#);
    }
}
