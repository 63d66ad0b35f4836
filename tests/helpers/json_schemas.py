"""Twenty JSON schemas of the kinds clients send (nested objects, arrays, enums, required keys, bounded
numbers, string patterns). Strings, arrays and numbers are bounded where a small model would otherwise
write on until its budget ends: the embedded model repeats digits and list items greedily."""

NAME = {"type": "string", "maxLength": 24}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 100}

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "enum_color": {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "boolean_flag": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    "bounded_number": {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["score"],
    },
    "string_pattern": {
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["zip"],
    },
    "date_pattern": {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["date"],
    },
    "array_of_enums": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["tags"],
    },
    "array_min_items": {
        "type": "object",
        "properties": {"ids": {"type": "array", "items": SMALL_INT, "minItems": 2, "maxItems": 4}},
        "required": ["ids"],
    },
    "nested_address": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {
                "type": "object",
                "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}$"}, "qty": SMALL_INT},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    "optional_keys": {
        "type": "object",
        "properties": {"title": NAME, "subtitle": NAME},
        "required": ["title"],
        "additionalProperties": False,
    },
    "nullable": {
        "type": "object",
        "properties": {"middle_name": {"anyOf": [NAME, {"type": "null"}]}},
        "required": ["middle_name"],
    },
    "const_value": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "event"}},
        "required": ["version", "kind"],
    },
    "number_range": {
        "type": "object",
        "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["ratio"],
    },
    "top_level_array": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
    "top_level_enum": {"type": "string", "enum": ["yes", "no", "maybe"]},
    "deep_nesting": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"type": "string", "enum": ["deep"]}},
                        "required": ["c"],
                    }
                },
                "required": ["b"],
            }
        },
        "required": ["a"],
    },
    "refs": {
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": SMALL_INT, "y": SMALL_INT}, "required": ["x", "y"]}},
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "one_of_shapes": {
        "oneOf": [
            {
                "type": "object",
                "properties": {"shape": {"const": "circle"}, "r": SMALL_INT},
                "required": ["shape", "r"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"shape": {"const": "square"}, "side": SMALL_INT},
                "required": ["shape", "side"],
                "additionalProperties": False,
            },
        ]
    },
    "many_required": {
        "type": "object",
        "properties": {
            "id": SMALL_INT,
            "name": NAME,
            "active": {"type": "boolean"},
            "role": {"type": "string", "enum": ["admin", "user"]},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        },
        "required": ["id", "name", "active", "role", "email"],
        "additionalProperties": False,
    },
}
